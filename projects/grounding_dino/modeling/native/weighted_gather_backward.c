/*
 * The backward of the deformable attention's weighted gather on the CPU (see
 * grounding_dino/modeling/weighted_gather.py):
 *
 *   forward:       out[n] = sum_k weights[n, k] * table[rows[n, k]]
 *   grad_table:    grad_table[rows[n, k]] += weights[n, k] * grad[n]
 *   grad_weights:  grad_weights[n, k] = table[rows[n, k]] . grad[n]
 *
 * in one pass over the corners, with no index tensors or gathered copies. Bag n = (b, q, m)
 * reads only rows of head m = n % heads (row % heads == m), so threads that own disjoint sets of
 * heads write disjoint rows of grad_table: no atomics, and each row's sum is made in bag order,
 * the same order on every run and any number of threads.
 *
 * Plain C with pthreads, loaded with ctypes (grounding_dino/modeling/native_kernels.py): it
 * needs no Python or torch headers and compiles in well under a second.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_THREADS 64

#define DEFINE_BACKWARD(NAME, SCALAR, INDEX)                                                     \
  typedef struct {                                                                             \
    const SCALAR* table;                                                                       \
    const INDEX* rows;                                                                         \
    const SCALAR* weights;                                                                     \
    const SCALAR* grad;                                                                        \
    SCALAR* grad_table;                                                                        \
    SCALAR* grad_weights;                                                                      \
    int64_t num_bags, corners, dim, heads, head_begin, head_end;                               \
  } NAME##_job;                                                                                \
                                                                                               \
  static void* NAME##_run(void* argument) {                                                    \
    const NAME##_job* job = (const NAME##_job*)argument;                                       \
    const int64_t corners = job->corners, dim = job->dim;                                      \
    for (int64_t head = job->head_begin; head < job->head_end; ++head) {                       \
      for (int64_t bag = head; bag < job->num_bags; bag += job->heads) {                       \
        const SCALAR* g = job->grad + bag * dim;                                               \
        const INDEX* bag_rows = job->rows + bag * corners;                                     \
        const SCALAR* bag_weights = job->weights + bag * corners;                              \
        for (int64_t k = 0; k < corners; ++k) {                                                \
          const int64_t row = (int64_t)bag_rows[k];                                            \
          if (job->grad_weights) {                                                             \
            const SCALAR* t = job->table + row * dim;                                          \
            SCALAR dot = 0;                                                                    \
            _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < dim; ++d) dot +=    \
                t[d] * g[d];                                                                   \
            job->grad_weights[bag * corners + k] = dot;                                        \
          }                                                                                    \
          if (job->grad_table) {                                                               \
            SCALAR* out = job->grad_table + row * dim;                                         \
            const SCALAR w = bag_weights[k];                                                   \
            _Pragma("omp simd") for (int64_t d = 0; d < dim; ++d) out[d] += w * g[d];          \
          }                                                                                    \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
    return NULL;                                                                               \
  }                                                                                            \
                                                                                               \
  /* grad_table must be zeroed by the caller; either output may be NULL. */                   \
  void NAME(const SCALAR* table, const INDEX* rows, const SCALAR* weights, const SCALAR* grad,   \
           int64_t num_bags, int64_t corners, int64_t dim, int64_t heads, SCALAR* grad_table,  \
           SCALAR* grad_weights, int threads) {                                                \
    NAME##_job jobs[MAX_THREADS];                                                              \
    pthread_t handles[MAX_THREADS];                                                            \
    if (threads > heads) threads = (int)heads;                                                 \
    if (threads > MAX_THREADS) threads = MAX_THREADS;                                          \
    if (threads < 1) threads = 1;                                                              \
    for (int i = 0; i < threads; ++i) {                                                        \
      NAME##_job job = {table, rows, weights, grad, grad_table, grad_weights, num_bags,        \
                        corners, dim, heads, heads * i / threads, heads * (i + 1) / threads};  \
      jobs[i] = job;                                                                           \
    }                                                                                          \
    int started[MAX_THREADS] = {0};                                                            \
    for (int i = 1; i < threads; ++i) /* a thread that cannot start runs in the caller */      \
      started[i] = pthread_create(&handles[i], NULL, NAME##_run, &jobs[i]) == 0;              \
    for (int i = 0; i < threads; ++i)                                                          \
      if (!started[i]) NAME##_run(&jobs[i]);                                                   \
    for (int i = 1; i < threads; ++i)                                                          \
      if (started[i]) pthread_join(handles[i], NULL);                                          \
  }

DEFINE_BACKWARD(weighted_gather_backward_f32_i32, float, int32_t)
DEFINE_BACKWARD(weighted_gather_backward_f32_i64, float, int64_t)
DEFINE_BACKWARD(weighted_gather_backward_f64_i32, double, int32_t)
DEFINE_BACKWARD(weighted_gather_backward_f64_i64, double, int64_t)
