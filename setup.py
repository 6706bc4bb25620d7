#!/usr/bin/env python
"""Installs the ``grounding_dino`` package from ``projects/grounding_dino``.

The layout follows detectron2's own ``setup.py``, which maps ``projects/`` to an importable
package with ``package_dir``.
"""
from setuptools import find_packages, setup

PROJECT_DIR = "projects/grounding_dino"


def _packages():
    subpackages = find_packages(PROJECT_DIR)
    return ["grounding_dino"] + [f"grounding_dino.{name}" for name in subpackages]


setup(
    name="grounding_dino",
    version="0.1.0",
    description="Grounding DINO (open-set detection with grounded pre-training) for Detectron2",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"grounding_dino": PROJECT_DIR},
    # The configs ship inside the package (``grounding_dino.model_zoo.get_config``); the
    # repository's top-level ``configs`` is a link to ``projects/grounding_dino/configs``.
    package_data={
        "grounding_dino": [
            "configs/*.py",
            "configs/*.yaml",
            "configs/common/*.py",
            "configs/common/*/*.py",
        ]
    },
    install_requires=[],  # the pinned stack lives in requirements.txt
)
