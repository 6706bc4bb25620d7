"""The converter never writes over a file it did not create (``--force`` replaces), and every
file it writes is atomic: an interrupted write leaves the old file and no temporary file."""

import os
import subprocess
import sys

import pytest
import torch

from grounding_dino.io.atomic import atomic_file, atomic_output, new_file_mode


def _convert_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "grounding_dino.convert", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from hf_reference import perturbed_hf_model

    folder = tmp_path_factory.mktemp("hf_src")
    perturbed_hf_model().save_pretrained(folder)
    return folder


def test_second_conversion_is_refused_naming_the_file_and_force_replaces(
    hf_folder, tmp_path, minilm_dir
):
    from grounding_dino.convert.__main__ import main as convert_main
    from grounding_dino.convert.build import convert_checkpoint

    out = tmp_path / "out"
    convert_checkpoint("hf", str(hf_folder), str(out), tokenizer=minilm_dir)
    args = ["hf", hf_folder, out, "--tokenizer", minilm_dir]
    weights = out / "model.pth"
    # A file the user put there (or an earlier result) stands for any content.
    weights.write_bytes(b"the user's file")
    before = sorted(os.listdir(out))

    again = _convert_cli(*args)
    assert again.returncode == 1
    assert f"{weights} exists; this command does not write over files: pass --force" in again.stderr
    assert weights.read_bytes() == b"the user's file"
    assert sorted(os.listdir(out)) == before

    # --force replaces (the same command in this process: a second start of Python is slow).
    assert convert_main([str(a) for a in args] + ["--force"]) == 0
    assert torch.load(weights, weights_only=True)["model"]  # the converted weights again
    assert sorted(os.listdir(out)) == before  # no temporary file left
    assert (os.stat(weights).st_mode & 0o777) == new_file_mode()  # not mkstemp's 0600
    # The converted config does not pin the CPU: "auto" runs on CUDA where there is one.
    assert "device: auto" in (out / "config.yaml").read_text()


def test_config_yaml_alone_is_refused_too(hf_folder, tmp_path, minilm_dir):
    from grounding_dino.convert.build import convert_checkpoint

    (tmp_path / "config.yaml").write_text("mine: 1\n")
    refusal = "config.yaml exists; this command does not write over files: pass --force"
    with pytest.raises(FileExistsError, match=refusal):
        convert_checkpoint("hf", str(hf_folder), str(tmp_path), tokenizer=minilm_dir)
    assert not (tmp_path / "model.pth").exists()
    assert (tmp_path / "config.yaml").read_text() == "mine: 1\n"


@pytest.mark.parametrize("writer", ["weights", "config"])
def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(
    hf_folder, tmp_path, minilm_dir, monkeypatch, writer
):
    from detectron2.config import LazyConfig

    from grounding_dino.convert.build import convert_checkpoint

    (tmp_path / "model.pth").write_bytes(b"old weights")
    (tmp_path / "config.yaml").write_text("old: config\n")

    def dies_midway(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed while writing")

    if writer == "weights":
        monkeypatch.setattr(torch, "save", dies_midway)
    else:
        monkeypatch.setattr(LazyConfig, "save", staticmethod(dies_midway))
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint("hf", str(hf_folder), str(tmp_path), tokenizer=minilm_dir, force=True)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "model.pth"]
    assert (tmp_path / "config.yaml").read_text() == "old: config\n"
    if writer == "weights":
        assert (tmp_path / "model.pth").read_bytes() == b"old weights"
    else:  # the weights were written (atomically) before the config write died
        assert torch.load(tmp_path / "model.pth", weights_only=True)["model"]


def test_atomic_writes_respect_the_umask_and_do_not_follow_planted_links(tmp_path):
    target = tmp_path / "result.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    # The old predictable temporary names: a link planted there is never written through.
    os.symlink(victim, tmp_path / f"result.json.tmp-{os.getpid()}")
    old_mask = os.umask(0o027)
    try:
        with atomic_file(target) as f:
            f.write("{}")
        assert (os.stat(target).st_mode & 0o777) == 0o640
    finally:
        os.umask(old_mask)
    assert target.read_text() == "{}" and victim.read_text() == "untouched"
    with pytest.raises(ValueError):
        with atomic_output(str(target)) as temporary:
            open(temporary, "w").write("partial")
            raise ValueError("serializer failed")
    assert target.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "result.json",
        f"result.json.tmp-{os.getpid()}",
        "victim.txt",
    ]
