"""The configs shipped with the package (``grounding_dino/configs``), found by name, so that
they work the same from a checkout and from an installed wheel (the repository's ``configs/``
is a link to them). :mod:`grounding_dino.model_zoo` loads them."""

from pathlib import Path

__all__ = ["configs_dir", "list_configs", "get_config_file"]


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
