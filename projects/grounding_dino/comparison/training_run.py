"""
Running the training benchmark's rows and its table (``tools/benchmark.py --train``): the rows
alternate step by step in one process, or each runs alone in its memory child
(``--rows-apart``); the steps themselves are :mod:`.training`'s.
"""

import statistics
from typing import Dict, List

from .training import build_training_steps, load_average, make_training_batch, timed_step

__all__ = ["format_training_report", "run_training_benchmark"]


def _median_after_first(times: List[float]) -> float:
    """The median step time without the first step (allocations, lazy optimizer state), or
    the first step's time when there is only one."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def run_training_benchmark(
    rows,
    hf_dir: str,
    out_dir: str,
    size,
    batch: int,
    steps: int,
    measure_memory=None,
    apart=False,
    precision="fp32",
) -> Dict:
    """
    Times ``steps`` training steps of every row (the forward in ``precision``, see
    :func:`.training.build_training_steps`; ``measure_memory`` must do the same),
    alternating rows step by step in this process,
    then (``measure_memory(row) -> {"loaded_mb", "peak_mb", ...}``) each row's peak memory in
    a process of its own. With ``apart``, the times are those of the memory processes (each
    row alone, one after the other: for sizes where the rows do not fit one process), from
    their steps before the one sampled for memory.

    Returns:
        ``{"times": {row: [s, ...]}, "medians": {row: s}, "cpu_times": {row: [s, ...]},
        "cpu_medians": {row: s}, "losses": {row: [...]}, "load_average": [...],
        "memory": {row: {...}}}`` (memory only with ``measure_memory``). CPU times are the
        process's (all its threads, ``time.process_time``): on a machine shared with other
        jobs they vary far less than wall times with 1 thread (with more, waiting threads
        may spin).
    """
    if apart:
        if measure_memory is None:
            raise ValueError("rows timed apart are timed in their memory processes")
        return _training_benchmark_apart(rows, measure_memory)
    training_batch = make_training_batch(size, batch)
    step_functions = build_training_steps(
        rows, hf_dir, out_dir, training_batch, precision=precision
    )
    times = {row: [] for row in rows}
    cpu_times = {row: [] for row in rows}
    losses = {row: [] for row in rows}
    loads = [load_average()]
    for index in range(steps):
        for row, step in step_functions.items():
            loss, seconds, cpu_seconds = timed_step(step)
            losses[row].append(loss)
            times[row].append(seconds)
            cpu_times[row].append(cpu_seconds)
            print(
                f"step {index + 1}/{steps} {row}: {times[row][-1]:.2f} s "
                f"({cpu_times[row][-1]:.2f} s CPU)",
                flush=True,
            )
        loads.append(load_average())
    del step_functions
    memory = None if measure_memory is None else {row: measure_memory(row) for row in rows}
    return _summary(times, cpu_times, losses, loads, memory)


def _training_benchmark_apart(rows, measure_memory) -> Dict:
    """:func:`run_training_benchmark` with every row timed in its own memory process."""
    loads, memory = [load_average()], {}
    for index, row in enumerate(rows):
        print(f"row {index + 1}/{len(rows)} {row}: its own process", flush=True)
        memory[row] = measure_memory(row)
        steps = ", ".join(f"{t:.2f} s" for t in memory[row]["times"])
        sampled = memory[row]["memory_step_s"]
        print(
            f"row {index + 1}/{len(rows)} {row}: steps {steps} "
            f"(then {sampled:.2f} s for the memory step, not timed)",
            flush=True,
        )
        loads.append(load_average())
    times, cpu_times, losses = (
        {row: memory[row].pop(key) for row in rows} for key in ("times", "cpu_times", "losses")
    )
    return _summary(times, cpu_times, losses, loads, memory)


def _summary(times, cpu_times, losses, loads, memory) -> Dict:
    """The result dictionary of :func:`run_training_benchmark` (``memory`` may be None)."""
    result = {
        "times": times,
        "medians": {row: _median_after_first(values) for row, values in times.items()},
        "cpu_times": cpu_times,
        "cpu_medians": {row: _median_after_first(values) for row, values in cpu_times.items()},
        "losses": losses,
        "load_average": loads,
    }
    if memory is not None:
        result["memory"] = memory
    return result


def format_training_report(result: Dict, header: str) -> str:
    """The benchmark's table: seconds per step (median without the first step), every step,
    peak RSS and peak allocated memory and their ratios to transformers', speed-up over
    transformers, the same in CPU time, and the step's matrix work (GFLOP, counted in the
    memory process) with the rate it ran at (GFLOP over the median wall time)."""
    memory = result.get("memory", {})
    medians = result["medians"]
    reference = medians.get("transformers")
    cpu_medians = result["cpu_medians"]
    cpu_reference = cpu_medians.get("transformers")
    width = max(len(row) for row in ["row", *medians]) + 2
    lines = [
        header,
        f"{'row':<{width}}{'s/step':>9}{'steps (s)':>28}{'peak RSS MB':>13}"
        f"{'allocated MB':>14}{'loaded MB':>11}{'speed-up':>10}{'RSS':>7}{'alloc.':>8}"
        f"{'CPU s/step':>12}{'CPU speed-up':>14}{'GFLOP':>9}{'GFLOP/s':>9}",
    ]
    hf_memory = memory.get("transformers", {})
    for row, median in medians.items():
        steps = ", ".join(f"{t:.2f}" for t in result["times"][row])
        peak, allocated, loaded, gflop = (
            memory.get(row, {}).get(key)
            for key in ("peak_mb", "allocated_mb", "loaded_mb", "gflop")
        )
        rate = None if gflop is None else gflop / median
        speed = f"{reference / median:.2f}x" if reference else "-"
        cpu = cpu_medians[row]
        cpu_speed = f"{cpu_reference / cpu:.2f}x" if cpu_reference else "-"
        lines.append(
            f"{row:<{width}}{median:>9.2f} {steps:>27}{_mb(peak):>13}{_mb(allocated):>14}"
            f"{_mb(loaded):>11}{speed:>10}{_ratio(peak, hf_memory.get('peak_mb')):>7}"
            f"{_ratio(allocated, hf_memory.get('allocated_mb')):>8}{cpu:>12.2f}{cpu_speed:>14}"
            f"{_count(gflop):>9}{_count(rate):>9}"
        )
    lines.extend(_still_settling(result["times"], medians))
    lines.append(
        "s/step (wall) and CPU s/step (the process's CPU time): medians without the first "
        "step; speed-ups, RSS and alloc.: against transformers; "
        "peak RSS and peak allocated (malloc's bytes in use, without what it keeps after "
        "frees): a process running only that row; GFLOP: the matrix products of one step "
        "(torch's FlopCounterMode, in that process), GFLOP/s: GFLOP / s/step; "
        f"load average {result['load_average'][0]} -> {result['load_average'][-1]}"
    )
    return "\n".join(lines)


# A last step this much faster than the median: the row's steps were still getting faster.
SETTLING_MARGIN = 0.05


def _still_settling(times: Dict[str, List[float]], medians: Dict[str, float]) -> List[str]:
    """A warning line for each row whose last step is more than :data:`SETTLING_MARGIN`
    under its median: a heap still growing to its high-water mark (transformers' steps at
    800x1333 fall for about 6 steps) makes the median overstate the steady step."""
    lines = []
    for row, values in times.items():
        if len(values) >= 3 and values[-1] < (1 - SETTLING_MARGIN) * medians[row]:
            under = 1 - values[-1] / medians[row]
            lines.append(
                f"warning: {row}: the last step ({values[-1]:.2f} s) is {under:.0%} under the "
                "median: its steps were still getting faster; more --steps give its steady time"
            )
    return lines


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _count(value) -> str:
    """Three significant digits at least: a full-size step has thousands of GFLOP, the tests'
    tiny model a few hundredths."""
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"
