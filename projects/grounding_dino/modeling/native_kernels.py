"""
Optional native CPU kernels, compiled on first use with the system's C compiler and loaded with
``ctypes``.

They are plain C (``native/*.c``, no Python or torch headers), so compiling takes well under a
second and needs only ``cc``. The library is cached per source, compiler and CPU (it is built
with ``-march=native``) in ``$GROUNDING_DINO_KERNEL_DIR``, else
``$XDG_CACHE_HOME/grounding_dino/kernels`` (``~/.cache/...``). Where no compiler is found or the
build fails, the callers keep their pure-PyTorch path and a warning says so, once per process.
``GROUNDING_DINO_NATIVE_KERNELS=0`` turns the kernels off.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Callable, Dict, Optional

import torch

__all__ = ["bilinear_sampling_backward_kernel", "kernel_library", "native_kernels_enabled"]

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "native", "deformable_sampling_backward.c")
ENABLE_VARIABLE = "GROUNDING_DINO_NATIVE_KERNELS"
DIRECTORY_VARIABLE = "GROUNDING_DINO_KERNEL_DIR"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread", "-shared", "-fPIC")

_lock = threading.Lock()
_library: Dict[str, object] = {}  # "lib": the CDLL or None once tried; "why": the reason if None

_SCALARS = {torch.float32: "f32", torch.float64: "f64"}


def native_kernels_enabled() -> bool:
    """False when ``GROUNDING_DINO_NATIVE_KERNELS`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENABLE_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_directory() -> str:
    if os.environ.get(DIRECTORY_VARIABLE):
        return os.environ[DIRECTORY_VARIABLE]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "grounding_dino", "kernels")


def _cpu_signature() -> str:
    """The CPU's model and instruction sets: a library built with ``-march=native`` on one CPU
    may not run on another that shares the cache folder."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compile(compiler: str, directory: str) -> str:
    """Builds the library into ``directory`` (once per source, compiler and CPU); returns its
    path. Raises ``OSError`` or ``subprocess.CalledProcessError`` when it cannot."""
    with open(SOURCE, "rb") as source:
        code = source.read()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(
        b"\0".join([code, version.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    path = os.path.join(directory, f"deformable_sampling_backward-{key}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(directory, exist_ok=True)
    # Built under a temporary name and renamed: processes that compile at the same time (the
    # workers of a data-parallel run) never load a half-written file.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", partial, SOURCE, "-lm"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def kernel_library() -> Optional[ctypes.CDLL]:
    """The compiled library, building it on the first call; None (with one warning per process)
    where it is turned off or cannot be built."""
    with _lock:
        if "lib" in _library:
            return _library["lib"]
        library, why = None, None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            why = "no C compiler (cc or gcc, or $CC) was found"
        else:
            try:
                library = ctypes.CDLL(_compile(compiler, _cache_directory()))
            except subprocess.CalledProcessError as error:
                why = f"{compiler} failed on {SOURCE}: {error.stderr.strip()[-500:]}"
            except OSError as error:
                why = f"building or loading it in {_cache_directory()} failed: {error}"
        if library is None:
            logger.warning(
                "The native CPU kernel of the deformable attention's backward is not available "
                "(%s); training on the CPU uses the pure-PyTorch backward instead, which gives "
                "the same gradients more slowly. Set %s=0 to silence this.",
                why,
                ENABLE_VARIABLE,
            )
        _library.update(lib=library, why=why)
        return library


def bilinear_sampling_backward_kernel(scalar: torch.dtype) -> Optional[Callable[..., None]]:
    """
    The C function of the whole bilinear sampling's backward
    (``bilinear_sampling_backward_f32/f64``): ``kernel(table, x, y, attention, grad, heights,
    widths, padded_starts, batch, queries, heads, levels, points, dim, rows_per_image,
    grad_table, grad_x, grad_y, grad_attention, threads)`` on contiguous CPU tensors'
    ``data_ptr()`` (int64 level arrays; outputs may be 0; ``grad_table`` zeroed). None where
    the dtype has no kernel, the kernels are turned off (``GROUNDING_DINO_NATIVE_KERNELS=0``) or
    the library cannot be built.
    """
    if scalar not in _SCALARS or not native_kernels_enabled():
        return None
    library = kernel_library()
    if library is None:
        return None
    function = getattr(library, f"bilinear_sampling_backward_{_SCALARS[scalar]}")
    if function.restype is not None:  # first use: declare the signature
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [pointer] * 8 + [size] * 7 + [pointer] * 4 + [ctypes.c_int]
        function.restype = None
    return function
