#!/usr/bin/env python
"""Installs the ``grounding_dino`` package from ``projects/grounding_dino``.

The layout follows detectron2's own ``setup.py``, which maps ``projects/`` to an importable
package with ``package_dir``. Applications (``tools/``: the demo job, the benchmark, the shapes
generator) are scripts of the repository, not part of the package.
"""
import os

from setuptools import find_packages, setup

PROJECT_DIR = "projects/grounding_dino"


def _packages():
    subpackages = find_packages(PROJECT_DIR)
    return ["grounding_dino"] + [f"grounding_dino.{name}" for name in subpackages]


def _config_files():
    """Every ``.py`` and ``.yaml`` under ``configs/``, relative to the package folder."""
    found = []
    for folder, _, files in os.walk(os.path.join(PROJECT_DIR, "configs")):
        for name in sorted(files):
            if name.endswith((".py", ".yaml")):
                found.append(os.path.relpath(os.path.join(folder, name), PROJECT_DIR))
    return sorted(found)


setup(
    name="grounding_dino",
    version="0.1.0",
    description="Grounding DINO (open-set detection with grounded pre-training) for Detectron2",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"grounding_dino": PROJECT_DIR},
    # The configs ship inside the package (``grounding_dino.model_zoo.get_config``); the
    # repository's top-level ``configs`` is a link to ``projects/grounding_dino/configs``. The C
    # sources of the optional CPU kernels are compiled on first use (modeling/native_kernels.py).
    package_data={"grounding_dino": _config_files() + ["modeling/native/*.c"]},
    install_requires=[],  # the pinned stack lives in requirements.txt
)
