"""Run-time switches of modules, and the one between eager and traceable size arithmetic.

Eagerly, some modules read sizes as Python ints: the feature levels' ``spatial_shapes.tolist()``,
detectron2 Swin's ``if``\\ s on the feature size. A trace (``torch.onnx.export``) records such
ints as constants, and the graph would be wrong at any other image size. Modules with a
``traceable`` attribute (:class:`~.enhancer.FeatureEnhancer`,
:class:`~.query_selector.LanguageGuidedQuerySelector`, :class:`~.backbone.swin.SwinBackbone`)
compute these sizes with tensor operations when it is True. The values are the same; the eager
form is the default because it skips the small tensor operations. :func:`tracing_mode` turns
the switch on for a block of code.
"""

import contextlib
from typing import Any, Iterable, Iterator, List, Sequence

import torch
from torch import nn

__all__ = ["level_sizes_of", "switched", "tracing_mode"]


def level_sizes_of(spatial_shapes: torch.Tensor, traceable: bool = False) -> List[Sequence]:
    """
    The (height, width) of each level of ``spatial_shapes`` [L, 2]: Python ints, or with
    ``traceable`` 0-dim tensors, which a trace keeps as functions of the input size.
    """
    if traceable:
        return [row.unbind(0) for row in spatial_shapes.unbind(0)]
    return spatial_shapes.tolist()


@contextlib.contextmanager
def switched(modules: Iterable[nn.Module], name: str, value: Any) -> Iterator[List[nn.Module]]:
    """
    Sets the attribute ``name`` of each of ``modules`` to ``value`` (yields the modules) and
    restores each module's own value afterwards, also when the body raises.
    """
    modules = list(modules)
    saved = [getattr(m, name) for m in modules]
    try:
        for module in modules:
            setattr(module, name, value)
        yield modules
    finally:
        for module, previous in zip(modules, saved):
            setattr(module, name, previous)


@contextlib.contextmanager
def tracing_mode(model: nn.Module) -> Iterator[int]:
    """Turns on the ``traceable`` switch of every module of ``model`` that has one (yields how
    many), restoring each afterwards."""
    modules = (m for m in model.modules() if isinstance(getattr(m, "traceable", None), bool))
    with switched(modules, "traceable", True) as switched_modules:
        yield len(switched_modules)
