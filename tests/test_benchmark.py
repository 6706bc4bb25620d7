"""``python -m grounding_dino.benchmark`` runs end to end on a tiny configuration.

It is a benchmark, not a test of speed: nothing here asserts which implementation is faster.
"""

import re

import pytest

from grounding_dino import benchmark


def test_tiny_benchmark_checks_outputs_and_prints_times_ratio_and_memory(tmp_path, capsys):
    code = benchmark.main(
        ["--tiny", "--runs", "1", "--threads", "1", "--size", "96x128", "--workdir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0
    diffs = re.search(r"max token score diff (\S+), max box diff (\S+) px", out)
    assert diffs, out
    assert float(diffs.group(1)) < benchmark.TOKEN_TOL
    assert float(diffs.group(2)) < benchmark.BOX_TOL_PX
    assert "Outputs equal (token scores 1e-4, boxes 0.05 px)" in out
    ratio = re.search(r"Speed-up of ours over transformers \(fp32\): (\S+)x", out)
    assert ratio and float(ratio.group(1)) > 0, out
    for name in ("transformers", "ours"):
        row = re.search(rf"^{name}\s+(\d+\.\d+)\s+.*\s(\d+)$", out, re.MULTILINE)
        assert row, out
        assert float(row.group(1)) > 0 and int(row.group(2)) > 100  # seconds, peak RSS MB
        peak = re.search(rf"Memory {name}: peak RSS (\d+) MB \(after loading (\d+) MB\)", out)
        assert peak and int(peak.group(1)) >= int(peak.group(2)), out
    assert "1 threads" in out and "image 96x128" in out
    # The models are kept in --workdir and reused by a later run.
    assert (tmp_path / "converted" / "config.yaml").is_file()
    assert (tmp_path / "tiny").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "800by1333"], "--size must be HEIGHTxWIDTH"),
        (["--size", "32x32"], "at least 64 pixels"),
        (["--runs", "0"], "--threads and --runs must be at least 1"),
    ],
)
def test_bad_options_get_a_clear_error(argv, message, capsys):
    assert benchmark.main(argv) == 1
    assert message in capsys.readouterr().err
