"""The configs shipped with the package, found by name as detectron2's ``model_zoo``.

Example::

    from grounding_dino.model_zoo import get_config

    cfg = get_config("grounding_dino_swin_t_ogc.py")     # a LazyConfig (omegaconf DictConfig)
    cfg = get_config("shapes_tiny.py")
    path = get_config_file("common/models/grounding_dino_swin_t.py")

Names are paths relative to the package's ``configs/`` folder (the repository's ``configs/``
is a link to it), so they work the same from a checkout and from an installed wheel.
"""

from pathlib import Path

from detectron2.config import LazyConfig

__all__ = ["configs_dir", "list_configs", "get_config_file", "get_config"]


def configs_dir() -> Path:
    """The folder of the packaged configs (``grounding_dino/configs``)."""
    return Path(__file__).resolve().parent / "configs"


def list_configs():
    """Names of the packaged top-level configs (``.py`` and ``.yaml``), sorted."""
    return sorted(p.name for p in configs_dir().iterdir() if p.suffix in (".py", ".yaml"))


def get_config_file(name: str) -> str:
    """
    The path of a packaged config.

    Args:
        name: a file name relative to ``configs/``, e.g. ``"grounding_dino_swin_t_ogc.py"``.

    Raises:
        FileNotFoundError: no such config (the message lists the shipped ones).
    """
    path = configs_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"No packaged config {name!r} in {configs_dir()}; available: "
            + ", ".join(list_configs())
        )
    return str(path)


def get_config(name: str):
    """Loads a packaged lazy config (``.py``) by name; see :func:`get_config_file`."""
    if not name.endswith(".py"):
        raise ValueError(f"get_config loads lazy .py configs; got {name!r}")
    return LazyConfig.load(get_config_file(name))
