"""Packaging: the wheel ships the library, its configs and its C kernel source, not the tools;
model_zoo finds them."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from grounding_dino import model_zoo

REPO = Path(__file__).resolve().parents[1]

SHIPPED_CONFIGS = [
    "grounding_dino/configs/grounding_dino_swin_t_ogc.py",
    "grounding_dino/configs/grounding_dino_swin_t_ogc.yaml",
    "grounding_dino/configs/grounding_dino_swin_b_cogcoor.yaml",
    "grounding_dino/configs/shapes_tiny.py",
    "grounding_dino/configs/common/models/grounding_dino_swin_t.py",
    "grounding_dino/configs/common/data/coco_detection.py",
    "grounding_dino/configs/common/train.py",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """
    The wheel of the repository's sources: ``pip wheel --no-deps --no-build-isolation``.

    The sources are copied first (setup.py, pyproject.toml, projects/grounding_dino): an
    in-tree build would leave ``build/`` in the checkout, and files that an earlier build
    left in ``build/lib`` would end up in the wheel and hide what setup.py declares.
    """
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "projects" / "grounding_dino",
        source / "projects" / "grounding_dino",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        command + ["-q", "-w", str(out), "."], cwd=source, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("grounding_dino-*.whl")
    return path


def test_wheel_ships_the_configs_and_not_the_tools(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in SHIPPED_CONFIGS if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    # Every config of the checkout is shipped (the same relative paths).
    configs = REPO / "projects" / "grounding_dino" / "configs"
    in_repo = {
        "grounding_dino/configs/" + p.relative_to(configs).as_posix()
        for p in configs.rglob("*")
        if p.suffix in (".py", ".yaml")
    }
    assert in_repo <= names, sorted(in_repo - names)
    assert "grounding_dino/__init__.py" in names and "grounding_dino/model_zoo.py" in names
    assert "grounding_dino/data/synthetic.py" in names
    # The C source that the CPU backward kernel is compiled from on first use.
    assert "grounding_dino/modeling/native/deformable_sampling_backward.c" in names
    # Applications are tools/, not library modules.
    for name in names:
        assert not name.startswith("tools/"), name
        assert "benchmark" not in name and "demo_job" not in name, name


def test_installed_wheel_loads_its_configs_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
    result = subprocess.run(install + [str(target), str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    script = (
        "import grounding_dino, grounding_dino.model_zoo as mz\n"
        "print(grounding_dino.__file__)\n"
        "print(mz.get_config_file('common/models/grounding_dino_swin_t.py'))\n"
        "cfg = mz.get_config('shapes_tiny.py')\n"
        "print(cfg.dataloader.test.dataset.names)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(target),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GROUNDING_DINO_SHAPES_DIR": str(tmp_path / "shapes"),
    }
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    package, model_file, test_set = run.stdout.strip().splitlines()[-3:]
    assert package == str(target / "grounding_dino" / "__init__.py")
    assert model_file == str(
        target / "grounding_dino/configs/common/models/grounding_dino_swin_t.py"
    )
    assert test_set == "shapes_val"


def test_get_config_loads_the_repository_config():
    path = model_zoo.get_config_file("shapes_tiny.py")
    # The repository's top-level configs/ is a link to the packaged folder.
    assert os.path.samefile(path, REPO / "configs" / "shapes_tiny.py")
    assert os.path.samefile(model_zoo.configs_dir(), REPO / "configs")
    cfg = model_zoo.get_config("shapes_tiny.py")
    assert {"model", "dataloader", "train", "optimizer"} <= set(cfg.keys())
    assert cfg.dataloader.test.dataset.names == "shapes_val"
    assert "shapes_tiny.py" in model_zoo.list_configs()
    assert "grounding_dino_swin_t_ogc.yaml" in model_zoo.list_configs()


def test_get_config_file_errors_name_the_problem():
    with pytest.raises(FileNotFoundError) as error:
        model_zoo.get_config_file("shapes_huge.py")
    message = str(error.value)
    assert "'shapes_huge.py'" in message
    for name in ("shapes_tiny.py", "grounding_dino_swin_t_ogc.py", "grounding_dino_r50.py"):
        assert name in message  # the available configs are listed
    with pytest.raises(ValueError, match="grounding_dino_swin_t_ogc.yaml"):
        model_zoo.get_config("grounding_dino_swin_t_ogc.yaml")
