"""The typed interfaces of the transformer: feature enhancer, query selector and decoder.

Their numerics against transformers' GroundingDinoEncoder/Decoder are covered end to end by
tests/test_model_parity.py; here: the output types and shapes, that padding (of the image and
of the text) never changes a valid output (a padded batch row equals the image alone), that
the decoder's self-attention mask blocks what it says, and that the registries build each
component by name from keyword-only arguments.
"""

from dataclasses import fields

import pytest
import torch

from grounding_dino.modeling.decoder import CrossModalityDecoder
from grounding_dino.modeling.enhancer import FeatureEnhancer
from grounding_dino.modeling.head import ContrastiveHead
from grounding_dino.modeling.query_selector import LanguageGuidedQuerySelector
from grounding_dino.modeling.registry import build_decoder, build_enhancer, build_query_selector
from grounding_dino.modeling.structures import EncodedText, ImageTokens, MultiScaleFeatures

D = 32
MAX_TEXT_LEN = 16
# Image A is smaller than the padded batch canvas at every level.
ALONE_SHAPES = [(7, 6), (4, 3), (2, 2)]
CANVAS_SHAPES = [(9, 11), (5, 6), (3, 3)]
ALONE_TEXT, CANVAS_TEXT = 7, 11

ENHANCER_KWARGS = dict(
    num_layers=2,
    d_model=D,
    num_levels=3,
    ffn_dim=64,
    num_heads=4,
    num_points=2,
    text_heads=2,
    text_ffn_dim=48,
    fusion_dim=64,
    fusion_heads=2,
    dropout=0.0,
    fusion_drop_path=0.0,
)
DECODER_KWARGS = dict(
    num_layers=3, d_model=D, num_heads=4, ffn_dim=64, num_levels=3, num_points=2, dropout=0.0
)


def _head():
    return ContrastiveHead(max_text_len=MAX_TEXT_LEN, bias_init=None, log_scale_init=None)


def _perturbed(module, seed=0):
    """``module`` in eval mode with every parameter moved off its (often zero) init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def _text(features, phrase_lengths):
    """EncodedText for one caption of phrases (sub-sentence mask, restarting position ids)."""
    length = features.shape[0]
    allowed = torch.zeros(length, length, dtype=torch.bool)
    position_ids = torch.zeros(length, dtype=torch.long)
    start = 0
    for size in phrase_lengths:
        allowed[start : start + size, start : start + size] = True
        position_ids[start : start + size] = torch.arange(size)
        start += size
    return EncodedText(
        features=features[None],
        token_mask=torch.ones(1, length, dtype=torch.bool),
        self_attention_mask=allowed[None],
        position_ids=position_ids[None],
        input_ids=torch.arange(length)[None],
    )


def _pad_text(text, length, gen):
    """``text`` padded to ``length`` tokens of random features (masked out)."""
    pad = length - text.features.shape[1]
    allowed = torch.eye(length, dtype=torch.bool)  # padding tokens only see themselves
    allowed[:-pad, :-pad] = text.self_attention_mask[0]
    return EncodedText(
        features=torch.cat([text.features, torch.randn(1, pad, D, generator=gen) * 5], 1),
        token_mask=torch.cat([text.token_mask, torch.zeros(1, pad, dtype=torch.bool)], 1),
        self_attention_mask=allowed[None],
        position_ids=torch.cat([text.position_ids, torch.zeros(1, pad, dtype=torch.long)], 1),
        input_ids=torch.cat([text.input_ids, torch.zeros(1, pad, dtype=torch.long)], 1),
    )


def _cat_text(texts):
    return EncodedText(
        *[torch.cat([getattr(t, field.name) for t in texts]) for field in fields(EncodedText)]
    )


def _image_features(shapes, gen):
    maps = [torch.randn(1, D, h, w, generator=gen) for h, w in shapes]
    masks = [torch.ones(1, h, w, dtype=torch.bool) for h, w in shapes]
    positions = [torch.randn(1, D, h, w, generator=gen) for h, w in shapes]
    return MultiScaleFeatures(maps, masks, positions)


def _padded_batch(alone: MultiScaleFeatures, gen):
    """A batch of ``alone`` zero-padded to the canvas (masks False outside) and a full image."""
    full = _image_features(CANVAS_SHAPES, gen)
    maps, masks, positions = [], [], []
    for level, (h, w) in enumerate(CANVAS_SHAPES):
        a_h, a_w = ALONE_SHAPES[level]
        grown = []
        for tensor in (alone.maps[level], alone.masks[level], alone.positions[level]):
            padded = tensor.new_zeros(tensor.shape[:-2] + (h, w))
            padded[..., :a_h, :a_w] = tensor
            grown.append(padded)
        # Garbage at padded positions must not matter either.
        grown[0][..., a_h:, :] = 3.0
        grown[2][..., :, a_w:] = -2.0
        maps.append(torch.cat([grown[0], full.maps[level]]))
        masks.append(torch.cat([grown[1], full.masks[level]]))
        positions.append(torch.cat([grown[2], full.positions[level]]))
    return MultiScaleFeatures(maps, masks, positions)


@pytest.fixture
def inputs():
    """(image A alone, text A alone, padded batch [A, B] of images and texts)."""
    gen = torch.Generator().manual_seed(0)
    alone = _image_features(ALONE_SHAPES, gen)
    text_a = _text(torch.randn(ALONE_TEXT, D, generator=gen), [1, 3, 2, 1])
    text_b = _text(torch.randn(CANVAS_TEXT, D, generator=gen), [1, 4, 5, 1])
    batch_text = _cat_text([_pad_text(text_a, CANVAS_TEXT, gen), text_b])
    return alone.flatten(), text_a, _padded_batch(alone, gen).flatten(), batch_text


def _valid_row(image: ImageTokens, tokens: torch.Tensor, row=0):
    """The valid tokens of batch row ``row`` in the alone image's order (level, row-major)."""
    return tokens[row][image.valid_mask[row]]


def test_enhancer_types_shapes_and_padding_invariance(inputs):
    alone, text_a, batch, batch_text = inputs
    enhancer = _perturbed(FeatureEnhancer(**ENHANCER_KWARGS))
    with torch.no_grad():
        image_out, text_out = enhancer(batch, batch_text)
        alone_out, text_alone_out = enhancer(alone, text_a)
    assert isinstance(image_out, ImageTokens) and isinstance(text_out, EncodedText)
    assert (
        image_out.tokens.shape == batch.tokens.shape == (2, sum(h * w for h, w in CANVAS_SHAPES), D)
    )
    assert text_out.features.shape == (2, CANVAS_TEXT, D)
    # Only the tokens and features change; the layout and masks are carried over.
    assert image_out.valid_mask is batch.valid_mask and image_out.positions is batch.positions
    assert text_out.token_mask is batch_text.token_mask
    assert (image_out.tokens - batch.tokens).abs().max() > 0.1
    # A padded batch row equals the image and caption alone, on the valid tokens.
    torch.testing.assert_close(
        _valid_row(batch, image_out.tokens), alone_out.tokens[0], atol=2e-5, rtol=0
    )
    torch.testing.assert_close(
        text_out.features[0, :ALONE_TEXT], text_alone_out.features[0], atol=2e-5, rtol=0
    )
    # The sub-sentence mask is used: letting every token see every other changes the text.
    open_text = EncodedText(
        text_a.features,
        text_a.token_mask,
        torch.ones_like(text_a.self_attention_mask),
        text_a.position_ids,
        text_a.input_ids,
    )
    with torch.no_grad():
        _, text_open_out = enhancer(alone, open_text)
    assert (text_open_out.features - text_alone_out.features).abs().max() > 1e-3


def test_enhancer_rejects_wrong_number_of_levels(inputs):
    alone, text_a, _, _ = inputs
    enhancer = FeatureEnhancer(**dict(ENHANCER_KWARGS, num_levels=4)).eval()
    with pytest.raises(ValueError, match="num_levels=4"):
        enhancer(alone, text_a)


def test_query_selector_types_shapes_and_padding_invariance(inputs):
    alone, text_a, batch, batch_text = inputs
    # As many queries as image A has positions: the padded row must select all of them and
    # none of its padding.
    num_queries = int(alone.valid_mask.sum())
    selector = LanguageGuidedQuerySelector(d_model=D, num_queries=num_queries, head=_head())
    selector = _perturbed(selector)
    assert selector.num_queries == num_queries
    with torch.no_grad():
        queries, reference, enc = selector(batch, batch_text)
        queries_a, reference_a, enc_a = selector(alone, text_a)
    assert queries.shape == (2, num_queries, D) and reference.shape == (2, num_queries, 4)
    assert enc["pred_logits"].shape == (2, num_queries, MAX_TEXT_LEN)
    assert enc["pred_boxes"].shape == (2, num_queries, 4)
    assert not reference.requires_grad
    torch.testing.assert_close(enc["pred_boxes"], reference.sigmoid())
    # The padded row selects the same positions as the image alone, in the same order.
    torch.testing.assert_close(queries[:1], queries_a)
    torch.testing.assert_close(reference[:1], reference_a, atol=2e-5, rtol=0)
    logits, logits_a = enc["pred_logits"][:1], enc_a["pred_logits"]
    assert torch.isinf(logits[..., ALONE_TEXT:]).all()
    assert torch.isinf(logits_a[..., ALONE_TEXT:]).all()
    torch.testing.assert_close(
        logits[..., :ALONE_TEXT], logits_a[..., :ALONE_TEXT], atol=2e-5, rtol=0
    )


def test_query_selector_needs_enough_positions(inputs):
    alone, text_a, _, _ = inputs
    selector = LanguageGuidedQuerySelector(d_model=D, num_queries=1000, head=_head())
    with pytest.raises(ValueError, match="num_queries=1000"):
        selector(alone, text_a)


def _decoder_queries(num, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, num, D, generator=gen), torch.randn(1, num, 4, generator=gen) * 0.5


def test_decoder_types_shapes_and_padding_invariance(inputs):
    alone, text_a, batch, batch_text = inputs
    decoder = _perturbed(CrossModalityDecoder(**DECODER_KWARGS))
    queries, reference = _decoder_queries(10, seed=1)
    other_queries, other_reference = _decoder_queries(10, seed=2)
    with torch.no_grad():
        hidden, boxes = decoder(
            torch.cat([queries, other_queries]),
            torch.cat([reference, other_reference]),
            batch,
            batch_text,
        )
        hidden_a, boxes_a = decoder(queries, reference, alone, text_a)
    assert len(hidden) == len(boxes) == DECODER_KWARGS["num_layers"]
    for h, b in zip(hidden, boxes):
        assert h.shape == (2, 10, D) and b.shape == (2, 10, 4)
        assert ((b >= 0) & (b <= 1)).all()
    for h, h_a, b, b_a in zip(hidden, hidden_a, boxes, boxes_a):
        torch.testing.assert_close(h[:1], h_a, atol=2e-5, rtol=0)
        torch.testing.assert_close(b[:1], b_a, atol=2e-5, rtol=0)
    # The boxes are refined: each layer moves them.
    assert (boxes[1] - boxes[0]).abs().max() > 1e-3


def test_decoder_self_attention_mask_blocks_what_it_says(inputs):
    alone, text_a, _, _ = inputs
    decoder = _perturbed(CrossModalityDecoder(**DECODER_KWARGS))
    first, first_ref = _decoder_queries(6, seed=3)
    second, second_ref = _decoder_queries(4, seed=4)
    queries, reference = torch.cat([first, second], 1), torch.cat([first_ref, second_ref], 1)
    # The first group may not see the second (as matching queries do not see denoising ones);
    # the second sees everything.
    allowed = torch.ones(10, 10, dtype=torch.bool)
    allowed[:6, 6:] = False
    with torch.no_grad():
        hidden, boxes = decoder(queries, reference, alone, text_a, self_attention_mask=allowed)
        hidden_open, _ = decoder(queries, reference, alone, text_a, self_attention_mask=None)
        hidden_first, boxes_first = decoder(first, first_ref, alone, text_a)
        hidden_second, _ = decoder(second, second_ref, alone, text_a)
    # Blocked: the first group's outputs are those of the group decoded on its own.
    for h, b, h_1, b_1 in zip(hidden, boxes, hidden_first, boxes_first):
        torch.testing.assert_close(h[:, :6], h_1, atol=2e-5, rtol=0)
        torch.testing.assert_close(b[:, :6], b_1, atol=2e-5, rtol=0)
    # Allowed: the second group does see the first, and without a mask so does the first.
    assert (hidden[-1][:, 6:] - hidden_second[-1]).abs().max() > 1e-3
    assert (hidden_open[-1][:, :6] - hidden_first[-1]).abs().max() > 1e-3


def test_decoder_rejects_malformed_mask(inputs):
    alone, text_a, _, _ = inputs
    decoder = CrossModalityDecoder(**DECODER_KWARGS).eval()
    queries, reference = _decoder_queries(5, seed=0)
    for mask in (torch.ones(4, 4, dtype=torch.bool), torch.zeros(5, 5)):
        with pytest.raises(ValueError, match="self_attention_mask"):
            decoder(queries, reference, alone, text_a, self_attention_mask=mask)


@pytest.mark.parametrize(
    "build, name, kwargs, cls",
    [
        (build_enhancer, "FeatureEnhancer", ENHANCER_KWARGS, FeatureEnhancer),
        (
            build_query_selector,
            "LanguageGuidedQuerySelector",
            dict(d_model=D, num_queries=5, head=ContrastiveHead(
                max_text_len=MAX_TEXT_LEN, bias_init=None, log_scale_init=None)),
            LanguageGuidedQuerySelector,
        ),
        (build_decoder, "CrossModalityDecoder", DECODER_KWARGS, CrossModalityDecoder),
        (build_decoder, "grounding_dino.modeling.decoder.CrossModalityDecoder", DECODER_KWARGS,
         CrossModalityDecoder),
    ],
)  # fmt: skip
def test_registries_build_by_name_with_required_keywords(build, name, kwargs, cls):
    component = build(name=name, **kwargs)
    assert type(component) is cls
    with pytest.raises(TypeError):  # every argument is required ...
        build(name=name, **{k: v for k, v in list(kwargs.items())[1:]})
    with pytest.raises(TypeError):  # ... and keyword-only
        cls(*kwargs.values())
    with pytest.raises(ValueError, match="no component named"):
        build(name="NoSuchComponent", **kwargs)


def test_parameter_names_are_the_checkpoint_keys():
    """The converter maps official / HF keys to these names."""
    enhancer = FeatureEnhancer(**dict(ENHANCER_KWARGS, num_layers=1))
    keys = set(enhancer.state_dict())
    assert "level_embed" in keys
    for key in (
        "layers.0.fusion.gamma_v",
        "layers.0.fusion.attn.values_l_proj.weight",
        "layers.0.text_layer.self_attn.in_proj_weight",
        "layers.0.image_layer.self_attn.sampling_offsets.bias",
        "layers.0.image_layer.linear2.weight",
    ):
        assert key in keys, key
    selector = LanguageGuidedQuerySelector(d_model=D, num_queries=5, head=_head())
    assert set(selector.state_dict()) == {
        "enc_output.weight",
        "enc_output.bias",
        "enc_output_norm.weight",
        "enc_output_norm.bias",
        "tgt_embed.weight",
        *(f"bbox_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")),
    }
    decoder = CrossModalityDecoder(**dict(DECODER_KWARGS, num_layers=1))
    prefixes = {key.split(".")[0] for key in decoder.state_dict()}
    assert prefixes == {"layers", "norm", "ref_point_head", "bbox_embed"}
    assert "layers.0.ca_text.in_proj_weight" in decoder.state_dict()
    assert "layers.0.cross_attn.value_proj.weight" in decoder.state_dict()


def test_model_config_builds_the_components():
    """The transformer nodes of the reference config tree build the registered components."""
    from detectron2.config import instantiate

    from grounding_dino.model_zoo import get_config

    model = get_config("common/models/grounding_dino_swin_t.py").model
    model.enhancer.num_layers = 1
    model.decoder.num_layers = 1
    enhancer = instantiate(model.enhancer)
    selector = instantiate(model.query_selector)
    decoder = instantiate(model.decoder)
    head = instantiate(model.head)
    assert type(enhancer) is FeatureEnhancer and len(enhancer.layers) == 1
    assert type(selector) is LanguageGuidedQuerySelector and type(selector.head) is ContrastiveHead
    assert type(decoder) is CrossModalityDecoder and len(decoder.layers) == 1
    assert type(head) is ContrastiveHead


def _network_outputs(model, image, classes):
    runs = model.prompt_encoder.runs_for_input(0, {"category_names": classes})
    with torch.no_grad():
        (normalised,) = model.preprocess_image([{"image": image}])
        return len(runs), model.forward_transformer([normalised] * len(runs), runs)


def test_config_overrides_change_what_the_model_computes(tiny_model):
    """
    Proves that the config's sizes reach the computation (not only the config): the same
    image and 16 classes (50 tokens) through shapes_tiny.py's model as configured
    (``tiny_model``: 100 queries, 3 decoder layers, 256 tokens) and with overrides of
    ``num_queries``, the decoder's depth and ``max_text_len`` (interpolated into the prompt
    encoder and both heads) give outputs of the overridden sizes, and the shorter token limit
    splits the classes over two prompt runs.
    """
    from detectron2.config import instantiate

    from grounding_dino.model_zoo import get_config

    overrides = [
        "model.query_selector.num_queries=7",
        "model.decoder.num_layers=2",
        "model.max_text_len=32",
    ]
    torch.manual_seed(0)
    overridden = instantiate(get_config("shapes_tiny.py", overrides).model).eval()
    image = torch.randint(0, 256, (3, 128, 160), dtype=torch.uint8)
    colours = ("red", "green", "blue", "yellow")
    classes = [f"{c} {s}" for c in colours for s in ("circle", "square", "star", "triangle")]
    for model, runs, queries, layers, tokens in (
        (tiny_model, 1, 100, 3, 256),
        (overridden, 2, 7, 2, 32),
    ):
        count, outputs = _network_outputs(model, image, classes)
        assert count == runs
        assert outputs["pred_logits"].shape == (runs, queries, tokens)
        assert outputs["pred_boxes"].shape == (runs, queries, 4)
        assert outputs["enc_outputs"]["pred_logits"].shape == (runs, queries, tokens)
        assert len(outputs["aux_outputs"]) == layers - 1
