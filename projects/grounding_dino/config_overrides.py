"""
``key=value`` overrides of a lazy config that refuse unknown keys: the one way every entry
point applies them (``train_net.py``, :mod:`grounding_dino.model_zoo`, the yacs bridge's
``MODEL.GROUNDING_DINO.OVERRIDES``, the tools and the demo job).

detectron2's ``LazyConfig.apply_overrides`` creates any key it is given, so a misspelt
``train.max_iterr=1`` trains with the default ``max_iter`` without a word. Here a key is known
when it exists in the config, or when it is a parameter of its node's ``_target_`` (the
signature of the function or class; for a detectron2 ``@configurable`` class also its
``from_config``); anything else is a :class:`UnknownConfigKeyError` naming the key and the
closest known key. A new key is added on purpose as in hydra, with a leading ``+``::

    train.max_iter=10                    # changes an existing key
    +train.my_note=hello                 # adds a key the config does not have
    ++train.my_note=hello                # sets it, whether it exists or not

Example::

    from grounding_dino.config_overrides import apply_overrides

    cfg = apply_overrides(LazyConfig.load("configs/shapes_tiny.py"), ["train.max_iter=10"])
"""

import difflib
import inspect
from typing import Iterator, List, Optional, Sequence, Set

from detectron2.config import LazyConfig
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["UnknownConfigKeyError", "apply_overrides", "check_override_key"]

_ABSENT = object()
_VALUE_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class UnknownConfigKeyError(KeyError):
    """An override names a key that is neither in the config nor an argument of its node's
    ``_target_``. Its message is printed as written (a plain ``KeyError`` quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _split(override: str):
    """(prefix of + signs, key, value) of ``override``."""
    if "=" not in override:
        raise ValueError(f"override {override!r} is not key=value")
    key, value = override.split("=", 1)
    stripped = key.lstrip("+")
    return key[: len(key) - len(stripped)], stripped.strip(), value


def _signature_names(function) -> Set[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return set()
    return {p.name for p in parameters if p.kind in _VALUE_KINDS}


def _target_parameters(node: DictConfig) -> Set[str]:
    """The keyword arguments the node's ``_target_`` accepts by name (``**kwargs`` are not
    names: a key meant for them is added with ``+``)."""
    if "_target_" not in node:
        return set()
    target = node._get_node("_target_")._value()
    if isinstance(target, str):
        try:
            target = locate(target)
        except Exception:  # an unimportable target fails later, at instantiate, with its name
            return set()
    names = _signature_names(target)
    from_config = getattr(target, "from_config", None)  # detectron2's @configurable classes
    if inspect.isclass(target) and from_config is not None:
        names |= _signature_names(from_config) - {"cfg"}
    return names - {"self", "cls"}


def _child(node, part: str):
    """The child ``part`` of a config node (not resolved: interpolations stay strings), or
    ``_ABSENT`` when there is none."""
    if isinstance(node, ListConfig):
        try:
            index = int(part)
        except ValueError:
            return _ABSENT
        if not -len(node) <= index < len(node):
            return _ABSENT
        child = node._get_node(index)
    elif part not in node:
        return _ABSENT
    else:
        child = node._get_node(part)
    return child if isinstance(child, (DictConfig, ListConfig)) else child._value()


def _all_keys(node, prefix: str = "") -> Iterator[str]:
    """Every key of the config, dotted, with its nodes' ``_target_`` parameters."""
    if isinstance(node, DictConfig):
        names = set(node.keys()) | _target_parameters(node)
        for name in sorted(names - {"_target_"}):
            key = f"{prefix}{name}"
            yield key
            child = _child(node, name)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _all_keys(child, key + ".")
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            child = node._get_node(index)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _all_keys(child, f"{prefix}{index}.")


def _closest(cfg, key: str, node, prefix: str, part: str) -> Optional[str]:
    """The known key closest to ``key``: a sibling of its unknown part when one is close,
    else the closest of all the config's keys."""
    if isinstance(node, DictConfig):
        siblings = sorted((set(node.keys()) | _target_parameters(node)) - {"_target_"})
        match = difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)
        if match:
            return prefix + match[0]
    match = difflib.get_close_matches(key, list(_all_keys(cfg)), n=1, cutoff=0.6)
    return match[0] if match else None


def check_override_key(cfg, key: str, override: Optional[str] = None) -> None:
    """
    Raises :class:`UnknownConfigKeyError` when ``key`` (dotted, e.g. ``"train.max_iter"``) is
    neither in ``cfg`` nor a parameter of the ``_target_`` of the node that would hold it.

    Args:
        cfg: the lazy config (``omegaconf.DictConfig``).
        key: the override's key, without its ``+`` signs.
        override: the whole override, for the message (default ``key=VALUE``).
    """
    override = override or f"{key}=VALUE"
    node, prefix = cfg, ""
    for part in key.split("."):
        if not isinstance(node, (DictConfig, ListConfig)):
            raise UnknownConfigKeyError(
                f"override {override}: {prefix.rstrip('.')} is {node!r}, not a config node, so "
                f"it has no key {part!r}"
            )
        child = _child(node, part)
        if child is _ABSENT:
            if isinstance(node, DictConfig) and part in _target_parameters(node):
                return  # an argument of the node's _target_ the config leaves at its default
            closest = _closest(cfg, key, node, prefix, part)
            hint = f"; did you mean {closest!r}?" if closest else "."
            raise UnknownConfigKeyError(
                f"unknown config key {key!r} (override {override}){hint} A key must exist in "
                f"the config or be an argument of its node's _target_; to add a new key on "
                f"purpose, write +{override}"
            )
        node, prefix = child, f"{prefix}{part}."


def apply_overrides(cfg, overrides: Sequence[str]):
    """
    Applies ``key=value`` overrides to a lazy config in place, as detectron2's
    ``LazyConfig.apply_overrides`` (hydra's grammar for values), after checking each key.

    Args:
        cfg: the lazy config.
        overrides: ``["train.max_iter=10", "+train.new_key=1", ...]``: ``key=value`` changes a
            known key (:func:`check_override_key`), ``+key=value`` adds a key that does not
            exist, ``++key=value`` sets a key whether it exists or not.

    Returns:
        ``cfg``.

    Raises:
        UnknownConfigKeyError: a key without ``+`` is unknown (the message names the closest
            known key), or a ``+key`` already exists.
        ValueError: an override is not ``key=value``.
    """
    checked: List[str] = []
    for override in overrides:
        plus, key, value = _split(override)
        exists = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
        if plus == "+" and exists is not _ABSENT:
            raise UnknownConfigKeyError(
                f"override {override}: {key} already exists; '+' adds a new key; write "
                f"{key}={value} to change it"
            )
        if not plus:
            check_override_key(cfg, key, override)
        checked.append(f"{key}={value}")
        # One at a time, so that a key added by one override is known to the next.
        LazyConfig.apply_overrides(cfg, checked[-1:])
    return cfg
