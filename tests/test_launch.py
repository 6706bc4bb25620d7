"""The CPU launch's end: a finished worker leaves no process group alive for the interpreter's
teardown (destroying a gloo group then can abort a run that succeeded)."""

import os
import subprocess
import sys
import textwrap

LEAVE_SCRIPT = textwrap.dedent("""
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from detectron2.utils import comm
    from detectron2.engine.launch import _find_free_port

    from grounding_dino.engine.launch import join_process_group, leave_process_groups

    url = f"tcp://127.0.0.1:{_find_free_port()}"
    join_process_group(url, 1, 0, 1, timedelta(seconds=60), timedelta(seconds=10))
    comm.create_local_process_group(1)
    comm._get_global_gloo_group()  # what detectron2's gather caches
    dist.all_reduce(torch.ones(3), async_op=True).wait()
    groups = [dist.group.WORLD, comm._LOCAL_PROCESS_GROUP]

    def holders():
        # references besides the list, the loop's variable and getrefcount's argument
        return sum(sys.getrefcount(group) - 3 for group in groups)

    dist.destroy_process_group()  # what the launch did before: torch's references only
    after_destroy = holders()
    leave_process_groups()
    print("holders", after_destroy, holders())
    """)


def test_leave_process_groups_destroys_detectron2s_references(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", LEAVE_SCRIPT],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("holders")][-1]
    after_destroy, after_leave = map(int, line.split()[1:])
    assert after_destroy >= 2  # detectron2 still held both after torch forgot them
    assert after_leave == 0
