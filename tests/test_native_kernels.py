"""The compiled CPU kernel of the deformable attention's backward: built once and cached, the
same gradients on any thread count, and a warned fallback on the pure-PyTorch backward where it
cannot be built or is turned off."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from test_train_net import REPO, write_fixture

from grounding_dino.modeling import native_kernels

PYTHON = sys.executable


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The kernels forgotten by this process and cached in a new folder; the process's own
    library is restored afterwards."""
    saved = dict(native_kernels._library)
    native_kernels._library.clear()
    monkeypatch.setenv(native_kernels.DIRECTORY_VARIABLE, str(tmp_path / "kernels"))
    monkeypatch.setenv(native_kernels.ENABLE_VARIABLE, "1")
    yield tmp_path / "kernels"
    native_kernels._library.clear()
    native_kernels._library.update(saved)


def test_kernel_is_built_once_and_reused(fresh_build):
    assert native_kernels.kernel_library() is not None
    built = sorted(fresh_build.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    modified = built[0].stat().st_mtime_ns
    native_kernels._library.clear()  # as a new process
    assert native_kernels.kernel_library() is not None
    assert sorted(fresh_build.iterdir()) == built
    assert built[0].stat().st_mtime_ns == modified


def test_turned_off_by_the_variable(fresh_build, monkeypatch):
    monkeypatch.setenv(native_kernels.ENABLE_VARIABLE, "0")
    assert not native_kernels.native_kernels_enabled()
    assert native_kernels.bilinear_sampling_backward_kernel(torch.float32) is None
    assert not fresh_build.exists()  # nothing was compiled


def test_half_precision_has_no_kernel(fresh_build):
    assert native_kernels.bilinear_sampling_backward_kernel(torch.bfloat16) is None


@pytest.mark.parametrize("failure", ["no_compiler", "bad_source"])
def test_a_failed_build_warns_once_and_falls_back(
    fresh_build, monkeypatch, tmp_path, caplog, failure
):
    expected = _sampling_gradients(torch.float64)  # the compiled kernel's
    native_kernels._library.clear()  # as a new process, which cannot build it:
    if failure == "no_compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        reason = "no-such-cc"
    else:
        broken = tmp_path / "broken.c"
        broken.write_text("this is not C;\n")
        monkeypatch.setattr(native_kernels, "SOURCE", str(broken))
        reason = "broken.c"
    for built in fresh_build.iterdir():
        built.unlink()
    with caplog.at_level(logging.WARNING, logger=native_kernels.__name__):
        got = _sampling_gradients(torch.float64)
        again = _sampling_gradients(torch.float64)
    warnings = [r for r in caplog.records if r.name == native_kernels.__name__]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert reason in message and "pure-PyTorch backward" in message
    assert native_kernels.ENABLE_VARIABLE in message
    for a, b, c in zip(got, again, expected):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
        assert torch.equal(a, b)
    if fresh_build.exists():  # the failed build left no partial library behind
        assert not [p for p in os.listdir(fresh_build) if p.endswith(".so")]


def test_train_net_without_a_compiler_says_so_and_trains(tmp_path):
    """A user's machine without ``cc``: ``train_net.py`` prints the fallback message once and
    trains on the pure-PyTorch backward."""
    config = write_fixture(str(tmp_path / "data"))
    kernels = tmp_path / "kernels"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        CC=str(tmp_path / "no-such-cc"),
        GROUNDING_DINO_KERNEL_DIR=str(kernels),
    )
    env.pop(native_kernels.ENABLE_VARIABLE, None)
    output_dir = tmp_path / "output"
    result = subprocess.run(
        [PYTHON, os.path.join(REPO, "train_net.py"), "--config-file", config]
        + ["train.max_iter=2", f"train.output_dir={output_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("The native CPU kernel of the deformable attention's backward") == 1
    assert "no-such-cc" in output and "pure-PyTorch backward" in output
    assert (output_dir / "model_final.pth").is_file()
    assert not kernels.exists() or not list(kernels.glob("*.so"))


def _sampling_gradients(dtype):
    """Gradients of the deformable sampling (table, coordinates, attention weights) on 2
    images, 3 heads, 2 levels, coordinates beyond the maps too."""
    from grounding_dino.modeling.deformable_kernels import padded_value_table, sample_padded_table

    gen = torch.Generator().manual_seed(2)  # drawn in float64, then cast: the same values
    shapes, starts = torch.tensor([[7, 9], [4, 5]]), torch.tensor([0, 63])
    value = torch.randn(2, 83, 3, 16, dtype=torch.float64, generator=gen)
    size = shapes.flip(-1).double().view(1, 1, 1, 2, 1, 2)
    points = torch.rand(2, 11, 3, 2, 4, 2, dtype=torch.float64, generator=gen) * (size + 3) - 1.5
    attention = torch.rand(2, 11, 3, 2, 4, dtype=torch.float64, generator=gen)
    probe = torch.randn(2, 11, 48, dtype=torch.float64, generator=gen).to(dtype)
    value, points, attention = (t.to(dtype).requires_grad_() for t in (value, points, attention))
    table = padded_value_table(value, shapes, starts)
    out = sample_padded_table(table, points[..., 0], points[..., 1], attention)
    return torch.autograd.grad((out * probe).sum(), [value, points, attention])


def test_sampling_kernel_float32_equals_float64_on_any_thread_count(fresh_build):
    assert native_kernels.bilinear_sampling_backward_kernel(torch.float32) is not None
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 5):
            torch.set_num_threads(count)
            results.append(_sampling_gradients(torch.float32))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    os.environ[native_kernels.ENABLE_VARIABLE] = "0"  # restored by fresh_build's monkeypatch
    expected = _sampling_gradients(torch.float64)
    for got, want in zip(results[0], expected):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
        assert got.abs().sum() > 0
