/*
 * The backward of the deformable attention's bilinear sampling on the CPU (see
 * grounding_dino/modeling/bilinear_sampling.py), in one pass over the sampling points, from the
 * saved table, coordinates and attention weights alone: no index tensors or gathered copies.
 * Bag n = (b, q, m) reads only rows of head m (row % heads == m), so threads that own disjoint
 * sets of heads write disjoint rows of grad_table: no atomics, and each row's sum is made in bag
 * order, the same order on every run and any number of threads.
 *
 * Plain C with pthreads, loaded with ctypes (grounding_dino/modeling/native_kernels.py): it
 * needs no Python or torch headers and compiles in well under a second.
 */
#include <pthread.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>

#define MAX_THREADS 64

/* Threads for `heads` heads: at most one per head, and 1 to MAX_THREADS. */
static int thread_count(int threads, int64_t heads) {
  if (threads > heads) threads = (int)heads;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  return threads < 1 ? 1 : threads;
}

/* run(job i) for i < threads, jobs of job_size bytes: jobs 1.. on new threads, job 0 (and any
 * whose thread cannot start) in the caller. */
static void run_jobs(void* jobs, size_t job_size, int threads, void* (*run)(void*)) {
  pthread_t handles[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  char* base = (char*)jobs;
  for (int i = 1; i < threads; ++i)
    started[i] = pthread_create(&handles[i], NULL, run, base + i * job_size) == 0;
  for (int i = 0; i < threads; ++i)
    if (!started[i]) run(base + i * job_size);
  for (int i = 1; i < threads; ++i)
    if (started[i]) pthread_join(handles[i], NULL);
}

/* One corner of a bag: out += w * g (when out is not NULL), and returns table_row . g (when
 * need_dot, else 0); rows of dim values. */
#define DEFINE_CORNER(SCALAR)                                                                   \
  static inline SCALAR corner_##SCALAR(const SCALAR* table_row, SCALAR* out, const SCALAR* g,  \
                                       SCALAR w, int64_t dim, int need_dot) {                  \
    SCALAR dot = 0;                                                                            \
    if (need_dot) {                                                                            \
      _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < dim; ++d) dot +=          \
          table_row[d] * g[d];                                                                 \
    }                                                                                          \
    if (out) {                                                                                 \
      _Pragma("omp simd") for (int64_t d = 0; d < dim; ++d) out[d] += w * g[d];                \
    }                                                                                          \
    return dot;                                                                                \
  }

DEFINE_CORNER(float)
DEFINE_CORNER(double)

/*
 * For each sampling point (bag n = (b, q, m), level l, point p) at pixel coordinates (x, y)
 * with attention weight a, clamped to [-1, W_l] x [-1, H_l], the four corners of its cell in the zero-bordered table
 * (rows ((start_l + (y0 + 1) * (W_l + 3) + x0 + 1) * heads + m) + b * rows_per_image and the
 * next column and row), their bilinear weights times a, and
 *
 *   grad_table[corner] += weight * grad[n]
 *   dot_k = table[corner_k] . grad[n]
 *   grad_a = lerp(top, bottom, fy), grad_y = a * (bottom - top), grad_x = a (1 - fy)
 *   (dot_1 - dot_0) + a fy (dot_3 - dot_2), with top = (1 - fx) dot_0 + fx dot_1 and bottom
 *   = (1 - fx) dot_2 + fx dot_3; grad_x and grad_y are zero where the clamp held the point.
 */
#define DEFINE_SAMPLING_BACKWARD(NAME, SCALAR)                                                  \
  typedef struct {                                                                             \
    const SCALAR *table, *x, *y, *attention, *grad;                                            \
    const int64_t *heights, *widths, *starts;                                                  \
    SCALAR *grad_table, *grad_x, *grad_y, *grad_attention;                                     \
    int64_t batch, queries, heads, levels, points, dim, rows_per_image, head_begin, head_end;  \
  } NAME##_job;                                                                                \
                                                                                               \
  static void* NAME##_run(void* argument) {                                                    \
    const NAME##_job* job = (const NAME##_job*)argument;                                       \
    const int64_t dim = job->dim, heads = job->heads;                                          \
    const int need_dots = job->grad_x || job->grad_y || job->grad_attention;                  \
    for (int64_t m = job->head_begin; m < job->head_end; ++m) {                                \
      for (int64_t bq = 0; bq < job->batch * job->queries; ++bq) {                             \
        const int64_t bag = bq * heads + m;                                                    \
        const int64_t image_row = (bq / job->queries) * job->rows_per_image + m;               \
        const SCALAR* g = job->grad + bag * dim;                                               \
        for (int64_t l = 0; l < job->levels; ++l) {                                            \
          const SCALAR height = (SCALAR)job->heights[l], width = (SCALAR)job->widths[l];       \
          const int64_t padded_width = job->widths[l] + 3;                                     \
          for (int64_t p = 0; p < job->points; ++p) {                                          \
            const int64_t i = (bag * job->levels + l) * job->points + p;                       \
            const SCALAR x = job->x[i], y = job->y[i], a = job->attention[i];                  \
            const int inside_x = x >= -1 && x <= width, inside_y = y >= -1 && y <= height;     \
            if (!(x == x && y == y)) continue; /* NaN: no gradient (the forward refuses it) */  \
            const SCALAR xc = x < -1 ? -1 : (x > width ? width : x);                           \
            const SCALAR yc = y < -1 ? -1 : (y > height ? height : y);                         \
            const SCALAR x0 = floor(xc), y0 = floor(yc);                                       \
            const SCALAR fx = xc - x0, fy = yc - y0;                                           \
            const SCALAR fy_a = fy * a, wy0 = a - fy_a, wx0 = 1 - fx;                          \
            const SCALAR w[4] = {wy0 * wx0, wy0 * fx, fy_a * wx0, fy_a * fx};                  \
            const int64_t top_left =                                                           \
                (job->starts[l] + ((int64_t)y0 + 1) * padded_width + (int64_t)x0 + 1) * heads + \
                image_row;                                                                     \
            const int64_t rows[4] = {top_left, top_left + heads, top_left + padded_width * heads, \
                                     top_left + (padded_width + 1) * heads};                   \
            SCALAR dots[4];                                                                    \
            for (int k = 0; k < 4; ++k)                                                        \
              dots[k] = corner_##SCALAR(                                                       \
                  job->table + rows[k] * dim,                                                  \
                  job->grad_table ? job->grad_table + rows[k] * dim : NULL, g, w[k], dim,      \
                  need_dots);                                                                  \
            const SCALAR top = wx0 * dots[0] + fx * dots[1];                                   \
            const SCALAR bottom = wx0 * dots[2] + fx * dots[3];                                \
            if (job->grad_attention) job->grad_attention[i] = top + fy * (bottom - top);       \
            if (job->grad_y) job->grad_y[i] = inside_y ? a * (bottom - top) : 0;               \
            if (job->grad_x)                                                                   \
              job->grad_x[i] =                                                                 \
                  inside_x ? wy0 * (dots[1] - dots[0]) + fy_a * (dots[3] - dots[2]) : 0;       \
          }                                                                                    \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
    return NULL;                                                                               \
  }                                                                                            \
                                                                                               \
  /* grad_table must be zeroed by the caller; any output may be NULL. */                       \
  void NAME(const SCALAR* table, const SCALAR* x, const SCALAR* y, const SCALAR* attention,    \
            const SCALAR* grad, const int64_t* heights, const int64_t* widths,                 \
            const int64_t* starts, int64_t batch, int64_t queries, int64_t heads,              \
            int64_t levels, int64_t points, int64_t dim, int64_t rows_per_image,               \
            SCALAR* grad_table, SCALAR* grad_x, SCALAR* grad_y, SCALAR* grad_attention,        \
            int threads) {                                                                     \
    NAME##_job jobs[MAX_THREADS];                                                              \
    threads = thread_count(threads, heads);                                                    \
    for (int i = 0; i < threads; ++i) {                                                        \
      NAME##_job job = {table,     x,          y,          attention,      grad,               \
                        heights,   widths,     starts,     grad_table,     grad_x,             \
                        grad_y,    grad_attention, batch,  queries,        heads,              \
                        levels,    points,     dim,        rows_per_image, heads * i / threads, \
                        heads * (i + 1) / threads};                                            \
      jobs[i] = job;                                                                           \
    }                                                                                          \
    run_jobs(jobs, sizeof(NAME##_job), threads, NAME##_run);                                   \
  }

DEFINE_SAMPLING_BACKWARD(bilinear_sampling_backward_f32, float)
DEFINE_SAMPLING_BACKWARD(bilinear_sampling_backward_f64, double)
