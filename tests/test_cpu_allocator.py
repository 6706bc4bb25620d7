"""CPU training keeps freed memory for the next step (``grounding_dino.engine.cpu_allocator``)."""

import json
import os
import subprocess
import sys

from grounding_dino.engine.cpu_allocator import MALLOC_SETTINGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A "training step": seven temporaries of 1 to 20 MB (the sizes of a CPU step's activations),
# allocated with malloc, written and freed; page faults per step after a first one. Without
# torch (its import takes long): the module file is loaded alone.
STEP = """
import ctypes, importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("cpu_allocator", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
applied = module.keep_freed_memory() if sys.argv[1] == "keep" else {}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():
    blocks = [libc.malloc(n << 20) for n in (1, 8, 3, 20, 5, 2, 12)]
    for block, n in zip(blocks, (1, 8, 3, 20, 5, 2, 12)):
        ctypes.memset(block, 1, n << 20)
    for block in blocks:
        libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(sorted(applied)), faults / 10)
"""
MODULE = os.path.join(REPO, "projects", "grounding_dino", "engine", "cpu_allocator.py")


def _run_step(mode: str, **malloc_variables):
    """(names of the settings applied, page faults per step) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run(
        [sys.executable, "-c", STEP, mode, MODULE],
        env={**env, **malloc_variables},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    names, faults = run.stdout.rsplit(" ", 1)
    return json.loads(names), float(faults)


def test_freed_temporaries_are_reused_without_page_faults():
    if not sys.platform.startswith("linux"):
        return  # glibc's mallopt; elsewhere keep_freed_memory applies nothing
    _, default = _run_step("default")
    applied, kept = _run_step("keep")
    assert applied == sorted(MALLOC_SETTINGS)
    # 51 MB per step is 13,000 pages: glibc's defaults fault most of them in again each step.
    assert default > 5000, default
    assert kept < 0.05 * default, (kept, default)


def test_the_users_malloc_variables_are_left_alone():
    if not sys.platform.startswith("linux"):
        return
    applied, _ = _run_step("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == sorted(set(MALLOC_SETTINGS) - {"MALLOC_TRIM_THRESHOLD_"})


# The module loaded alone, malloc and free through ctypes, the process's anonymous memory.
HEAP = """
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("cpu_allocator", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def anonymous_mb():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024
"""

TRIM = HEAP + """
size = 60 << 10  # heap blocks (under glibc's mmap threshold)
blocks = [libc.malloc(size) for _ in range(2000)]
for block in blocks:
    ctypes.memset(block, 1, size)
for block in blocks[:-1]:  # the last one keeps the freed ones from being the heap's top
    libc.free(block)
before = anonymous_mb()
trimmed = module.return_freed_memory()
print(json.dumps({"trimmed": trimmed, "released_mb": before - anonymous_mb()}))
"""


KEPT = HEAP + """
module.keep_freed_memory()
size = 16 << 20  # heap blocks (under the 32 MiB mmap threshold)
blocks = [libc.malloc(size) for _ in range(72)]  # 1152 MiB
for block in blocks:
    ctypes.memset(block, 1, size)
before = anonymous_mb()
for block in reversed(blocks):  # all of it becomes the heap's free top
    libc.free(block)
print(json.dumps({"released_mb": before - anonymous_mb()}))
"""


def test_a_freed_heap_top_over_1_gib_is_kept():
    """A backward at the official sizes frees more than 1 GiB at the heap's top at once; given
    back (any finite trim threshold), the next step would fault it in again."""
    if not sys.platform.startswith("linux"):
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run(
        [sys.executable, "-c", KEPT, MODULE], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["released_mb"] < 64, run.stdout


def test_return_freed_memory_gives_freed_heap_blocks_back():
    """120 MB freed below a live block stay in the process until ``return_freed_memory``."""
    module = os.path.join(REPO, "projects", "grounding_dino", "engine", "cpu_allocator.py")
    run = subprocess.run([sys.executable, "-c", TRIM, module], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["trimmed"] and result["released_mb"] > 100, result
