"""
The demo job trains in a staging folder (``<output>/.training``) and publishes the trained
model and its ``config.yaml`` together when training has ended, so that an interrupted
(re)training never leaves a ``config.yaml`` beside a model it did not train.
"""

import os
import shutil
from typing import List

__all__ = ["STAGING_NAME", "start_staging", "publish_run"]

STAGING_NAME = ".training"
CONFIG_NAME = "config.yaml"


def start_staging(output_dir: str) -> str:
    """
    An empty staging folder in ``output_dir``; one left by an interrupted run of the job is
    removed first (it holds only that run's unfinished training, which the job created).

    Returns:
        the staging folder's path.
    """
    staging = os.path.join(output_dir, STAGING_NAME)
    if os.path.isdir(staging):
        print(
            f"[train] removing {staging}: the unfinished training of an interrupted run",
            flush=True,
        )
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def publish_run(staging: str, output_dir: str) -> List[str]:
    """
    Moves every file of ``staging`` (the trained model, ``config.yaml``, ``metrics.json``,
    ...) into ``output_dir`` and removes ``staging``. Each move is a rename on the same file
    system (atomic). The old ``config.yaml`` is removed first and the new one moved last, so
    at every instant ``output_dir`` holds either the old model with its config, a model
    without a config, or the new model with its config.

    Returns:
        the names of the files of an earlier run that were replaced.

    Raises:
        FileNotFoundError: ``staging`` holds no ``config.yaml``.
    """
    names = sorted(
        name for name in os.listdir(staging) if os.path.isfile(os.path.join(staging, name))
    )
    if CONFIG_NAME not in names:
        raise FileNotFoundError(f"{staging} holds no {CONFIG_NAME} to publish with the model")
    replaced = [name for name in names if os.path.exists(os.path.join(output_dir, name))]
    old_config = os.path.join(output_dir, CONFIG_NAME)
    if os.path.exists(old_config):
        os.remove(old_config)
    for name in names:
        if name != CONFIG_NAME:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    os.replace(os.path.join(staging, CONFIG_NAME), old_config)
    shutil.rmtree(staging)
    return replaced
