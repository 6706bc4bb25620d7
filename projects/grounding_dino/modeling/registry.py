"""Registries of the swappable Grounding DINO components, and the functions that build them.

The configs build every component through its registry by name, as Mask2Former's
``build_pixel_decoder`` does::

    backbone=L(build_image_backbone)(name="SwinBackbone", variant="swin_T_224_1k", ...)

so a user can register a component in their own module and select it with a ``key=value``
override on ``train_net.py``'s command line (or in the yacs bridge's ``OVERRIDES``)::

    # my_project/enhancers.py
    from grounding_dino.modeling import FEATURE_ENHANCER_REGISTRY

    @FEATURE_ENHANCER_REGISTRY.register()
    class MyEnhancer(nn.Module): ...

    python train_net.py --config-file configs/shapes_tiny.py \\
        model.enhancer.name=my_project.enhancers.MyEnhancer

A dotted name imports its module first (so the decorator runs, in every worker process), then
looks up the last part in the registry. The component receives the other keyword arguments of
its config node. The interfaces each kind of component must implement are in
docs/interfaces.md.
"""

from typing import Any

from detectron2.utils.registry import Registry, locate

IMAGE_BACKBONE_REGISTRY = Registry("GROUNDING_DINO_IMAGE_BACKBONE")
IMAGE_BACKBONE_REGISTRY.__doc__ = """Image bodies: detectron2 ``Backbone``s, [B,3,H,W] -> dict of
maps, with ``output_shape()``."""

TEXT_ENCODER_REGISTRY = Registry("GROUNDING_DINO_TEXT_ENCODER")
TEXT_ENCODER_REGISTRY.__doc__ = """Text encoders: ``TokenizedText`` -> ``EncodedText``."""

FEATURE_ENHANCER_REGISTRY = Registry("GROUNDING_DINO_FEATURE_ENHANCER")
FEATURE_ENHANCER_REGISTRY.__doc__ = """Feature enhancers: (``ImageTokens``, ``EncodedText``) ->
the same, fused."""

QUERY_SELECTOR_REGISTRY = Registry("GROUNDING_DINO_QUERY_SELECTOR")
QUERY_SELECTOR_REGISTRY.__doc__ = """Query selectors: (``ImageTokens``, ``EncodedText``) ->
decoder queries and anchors."""

DECODER_REGISTRY = Registry("GROUNDING_DINO_DECODER")
DECODER_REGISTRY.__doc__ = """Cross-modality decoders: queries -> per-layer hidden states and
boxes."""

__all__ = [
    "IMAGE_BACKBONE_REGISTRY",
    "TEXT_ENCODER_REGISTRY",
    "FEATURE_ENHANCER_REGISTRY",
    "QUERY_SELECTOR_REGISTRY",
    "DECODER_REGISTRY",
    "build_from_registry",
    "build_image_backbone",
    "build_text_encoder",
    "build_enhancer",
    "build_query_selector",
    "build_decoder",
]


def build_from_registry(registry: Registry, name: str, **kwargs) -> Any:
    """
    Builds ``registry``'s component ``name`` with ``kwargs``.

    Args:
        registry: one of this module's registries.
        name: a registered name (``"FeatureEnhancer"``), or ``"package.module.Name"``: the
            module is imported first (registering its components), then ``Name`` is looked up.
        kwargs: the component's keyword arguments.

    Raises:
        ValueError: ``name`` is empty, its module cannot be found, or nothing is registered
            under it (the message lists what is). An error raised while the module is
            imported propagates (detectron2's ``locate`` names the module).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{registry._name}: the component name must be a non-empty string")
    module_name, _, short_name = name.rpartition(".")
    if module_name:
        try:
            locate(module_name)  # imports it (detectron2's locate, as LazyConfig's _target_)
        except ImportError as error:
            raise ValueError(
                f"{registry._name}: cannot import module {module_name!r} of component "
                f"{name!r}: {error}"
            ) from error
    if short_name not in registry:
        known = ", ".join(sorted(name for name, _ in registry))
        raise ValueError(
            f"{registry._name}: no component named {short_name!r} (registered: {known}). "
            "Register it with @<REGISTRY>.register() in a module, and name it as "
            "'module.path.ClassName' so the module is imported."
        )
    return registry.get(short_name)(**kwargs)


def build_image_backbone(*, name: str, **kwargs):
    """Builds an image body of :data:`IMAGE_BACKBONE_REGISTRY` (see :func:`build_from_registry`)."""
    return build_from_registry(IMAGE_BACKBONE_REGISTRY, name, **kwargs)


def build_text_encoder(*, name: str, **kwargs):
    """Builds a text encoder of :data:`TEXT_ENCODER_REGISTRY`."""
    return build_from_registry(TEXT_ENCODER_REGISTRY, name, **kwargs)


def build_enhancer(*, name: str, **kwargs):
    """Builds a feature enhancer of :data:`FEATURE_ENHANCER_REGISTRY`."""
    return build_from_registry(FEATURE_ENHANCER_REGISTRY, name, **kwargs)


def build_query_selector(*, name: str, **kwargs):
    """Builds a query selector of :data:`QUERY_SELECTOR_REGISTRY`."""
    return build_from_registry(QUERY_SELECTOR_REGISTRY, name, **kwargs)


def build_decoder(*, name: str, **kwargs):
    """Builds a decoder of :data:`DECODER_REGISTRY`."""
    return build_from_registry(DECODER_REGISTRY, name, **kwargs)
