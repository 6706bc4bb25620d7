"""
Multi-process launch that also works on the CPU.

detectron2's :func:`~detectron2.engine.launch` picks NCCL whenever CUDA is available and
expects one GPU per process. With ``train.device=cpu`` we want gloo and no GPU at all (also on
a machine that has GPUs), so CPU jobs are spawned here; GPU jobs go to detectron2's launch.
"""

import gc
import logging
import os
import time
from datetime import timedelta
from typing import Callable, Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm

__all__ = [
    "launch",
    "launch_from_args",
    "is_cpu_device",
    "join_process_group",
    "leave_process_groups",
]

logger = logging.getLogger(__name__)


def is_cpu_device(device) -> bool:
    """True for "cpu" (or a ``torch.device`` of type cpu)."""
    return torch.device(device).type == "cpu"


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "cuda",
    join_timeout: Optional[timedelta] = None,
) -> None:
    """
    Runs ``main_func(*args)`` in ``num_processes_per_machine`` processes per machine.

    Args:
        main_func: the function each process runs.
        num_processes_per_machine: processes on this machine (``--num-gpus``); on the CPU
            they share the cores, each with ``cpu_count // processes`` torch threads.
        num_machines, machine_rank, dist_url, timeout: as detectron2's launch
            (``dist_url="auto"`` picks a free local port).
        args: arguments of ``main_func``.
        device: ``train.device``. "cpu" uses the gloo backend and no GPU; anything else
            goes to detectron2's launch (NCCL when CUDA is available).
        join_timeout: with gloo, how long the processes wait for each other to start (the
            missing ranks are named when it runs out); default ``timeout``.
    """
    if not is_cpu_device(device):
        d2_launch(
            main_func,
            num_processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=tuple(args),
            timeout=timeout,
        )
        return
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto is not supported in multi-machine jobs")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(
            main_func,
            world_size,
            num_processes_per_machine,
            machine_rank,
            dist_url,
            args,
            timeout,
            join_timeout or timeout,
        ),
        daemon=False,
    )


def launch_from_args(
    main_func: Callable,
    args,
    main_args: Sequence,
    device: str,
    join_timeout: Optional[timedelta] = None,
) -> None:
    """
    :func:`launch` with the process layout of a command line built by detectron2's
    ``default_argument_parser`` (``--num-gpus``, ``--num-machines``, ``--machine-rank``,
    ``--dist-url``): ``main_func(*main_args)`` in each process.
    """
    launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=tuple(main_args),
        device=device,
        join_timeout=join_timeout,
    )


def join_process_group(
    dist_url: str,
    world_size: int,
    rank: int,
    processes_per_machine: int,
    timeout: timedelta,
    join_timeout: timedelta,
) -> None:
    """
    Joins the gloo process group at ``dist_url`` (``tcp://host:port``; rank 0 serves it),
    waiting at most ``join_timeout`` for every rank to arrive.

    Raises:
        RuntimeError: naming the ranks (and machines) that did not arrive in time.
    """
    url = urlparse(dist_url)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"--dist-url {dist_url}: expected tcp://HOST:PORT")
    wait = join_timeout.total_seconds()
    try:
        store = dist.TCPStore(
            url.hostname,
            url.port,
            world_size,
            is_master=rank == 0,
            timeout=join_timeout,
            wait_for_workers=False,
        )
    except Exception as error:
        raise RuntimeError(
            f"rank 0 (machine 0) did not answer at {dist_url} within {wait:.0f} s: start the "
            f"same command with --machine-rank 0 there ({error})"
        ) from None
    store.set(f"joined/{rank}", "1")
    deadline = time.monotonic() + wait
    while True:
        missing = [r for r in range(world_size) if not store.check([f"joined/{r}"])]
        if not missing:
            break
        if time.monotonic() > deadline:
            machines = sorted({r // processes_per_machine for r in missing})
            raise RuntimeError(
                f"rank(s) {', '.join(map(str, missing))} (machine(s) "
                f"{', '.join(map(str, machines))}) did not join {dist_url} within {wait:.0f} s: "
                "start the same command with their --machine-rank, or use fewer --num-machines"
            )
        time.sleep(0.1)
    store.set_timeout(timeout)
    dist.init_process_group(
        backend="gloo", store=store, world_size=world_size, rank=rank, timeout=timeout
    )


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_processes_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Sequence,
    timeout: timedelta,
    join_timeout: timedelta,
) -> None:
    global_rank = machine_rank * num_processes_per_machine + local_rank
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    try:
        join_process_group(
            dist_url, world_size, global_rank, num_processes_per_machine, timeout, join_timeout
        )
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    comm.create_local_process_group(num_processes_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
        comm.synchronize()  # every rank has finished before any leaves (rank 0 serves the store)
    finally:
        leave_process_groups()


def leave_process_groups() -> None:
    """
    Destroys every process group of this process, and the references detectron2 keeps to them.

    ``dist.destroy_process_group`` only forgets torch's own references: detectron2's local group
    (``comm._LOCAL_PROCESS_GROUP``) and its cached gather group (``comm._get_global_gloo_group``)
    would keep the gloo groups alive until the interpreter is torn down, when destroying a group
    that still holds work can abort the process (SIGABRT, "terminate called without an active
    exception") after a run that succeeded.
    """
    comm._LOCAL_PROCESS_GROUP = None
    comm._get_global_gloo_group.cache_clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the groups' destructors run now, with the interpreter alive
