"""Inference runs the wide row-wise layers (the enhancer's image FFN, Swin's MLPs, the deformable
attention's sampling) on chunks of tokens (``rowwise_in_chunks``): the outputs equal the
whole-tensor ones, training keeps the whole path, and a traced graph (ONNX export) keeps a
dynamic number of tokens."""

import pytest
import torch

import grounding_dino.modeling.backbone.swin as swin_module
import grounding_dino.modeling.deformable_attention as deformable_module
import grounding_dino.modeling.enhancer as enhancer_module
from grounding_dino.modeling.backbone import SwinBackbone
from grounding_dino.modeling.deformable_attention import MultiScaleDeformableAttention
from grounding_dino.modeling.enhancer import DeformableEncoderLayer
from grounding_dino.modeling.utils import rowwise_in_chunks

WHOLE = 10**9


def test_rowwise_in_chunks_equals_whole_and_keeps_shape():
    layer = torch.nn.Linear(6, 3)
    x = torch.randn(2, 23, 6)
    for chunk in (1, 4, 23, 100):
        out = rowwise_in_chunks(layer, x, chunk)
        assert out.shape == (2, 23, 3)
        torch.testing.assert_close(out, layer(x), rtol=0, atol=1e-6)


def test_rowwise_in_chunks_runs_whole_while_tracing():
    calls = []

    def fn(x):
        calls.append(int(x.shape[1]))
        return x * 2

    traced = torch.jit.trace(
        lambda x: rowwise_in_chunks(fn, x, 4), torch.randn(1, 10, 3), check_trace=False
    )
    assert calls == [10]  # one call on all rows, not chunks of 4
    x = torch.randn(1, 17, 3)  # another row count through the same graph
    torch.testing.assert_close(traced(x), x * 2)


def test_rowwise_in_chunks_chunks_only_on_the_cpu():
    calls = []

    def fn(x):
        calls.append(x.shape[1])
        return x

    rowwise_in_chunks(fn, torch.empty(1, 10, 3), 4)
    assert calls == [4, 4, 2]
    calls.clear()
    rowwise_in_chunks(fn, torch.empty(1, 10, 3, device="meta"), 4)  # stands in for CUDA
    assert calls == [10]


def _encoder_layer_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[6, 7], [3, 4]])
    tokens = int((shapes[:, 0] * shapes[:, 1]).sum())
    starts = torch.tensor([0, 42])
    image = torch.randn(2, tokens, 32, generator=gen)
    pos = torch.randn(2, tokens, 32, generator=gen)
    reference = torch.rand(2, tokens, 2, 2, generator=gen)
    mask = torch.ones(2, tokens, dtype=torch.bool)
    return image, pos, reference, shapes, starts, mask


def _whole_and_chunked(monkeypatch, module, constant: str, chunk: int, run):
    """``run()`` without gradients with ``module.<constant>`` so large that nothing is
    chunked, then with ``chunk``."""
    with torch.no_grad():
        monkeypatch.setattr(module, constant, WHOLE)
        whole = run()
        monkeypatch.setattr(module, constant, chunk)
        chunked = run()
    return whole, chunked


def test_enhancer_ffn_chunks_equal_whole(monkeypatch):
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(
        d_model=32, ffn_dim=64, num_heads=4, num_levels=2, num_points=2, dropout=0.0
    ).eval()
    inputs = _encoder_layer_inputs()
    whole, chunked = _whole_and_chunked(  # 54 tokens: 11 chunks of 5
        monkeypatch, enhancer_module, "FFN_CHUNK_TOKENS", 5, lambda: layer(*inputs)
    )
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_enhancer_ffn_trains_whole(monkeypatch):
    monkeypatch.setattr(enhancer_module, "FFN_CHUNK_TOKENS", 5)
    monkeypatch.setattr(
        enhancer_module,
        "rowwise_in_chunks",
        lambda *a: pytest.fail("training must not chunk"),
    )
    layer = DeformableEncoderLayer(
        d_model=32, ffn_dim=64, num_heads=4, num_levels=2, num_points=2, dropout=0.1
    ).train()
    layer(*_encoder_layer_inputs()).sum().backward()
    assert layer.linear1.weight.grad is not None


def test_swin_mlp_chunks_equal_whole(monkeypatch):
    torch.manual_seed(0)
    body = SwinBackbone(
        variant=dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7),
        out_indices=(1, 2, 3),
        drop_path_rate=0.0,
        frozen_stages=-1,
        use_checkpoint=False,
    ).eval()
    # The checkpoint keys stay detectron2's (mlp.fc1, mlp.fc2).
    assert "layers.0.blocks.0.mlp.fc1.weight" in body.state_dict()
    images = torch.randn(1, 3, 96, 128)
    whole, chunked = _whole_and_chunked(  # 768 first-stage tokens: 21 chunks of 37
        monkeypatch, swin_module, "MLP_CHUNK_TOKENS", 37, lambda: body(images)
    )
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=0, atol=1e-5)


def test_deformable_attention_query_chunks_equal_whole(monkeypatch):
    torch.manual_seed(0)
    attention = MultiScaleDeformableAttention(
        embed_dim=32, num_heads=4, num_levels=2, num_points=3
    ).eval()
    image, pos, reference, shapes, starts, mask = _encoder_layer_inputs()
    mask[1, -5:] = False
    boxes = torch.cat([reference, torch.rand_like(reference) * 0.3], -1)  # decoder-style boxes
    for points in (reference, boxes):
        args = (image + pos, points, image, shapes, starts, mask)
        whole, chunked = _whole_and_chunked(  # 54 queries: 7 chunks of 8
            monkeypatch, deformable_module, "QUERY_CHUNK", 8, lambda args=args: attention(*args)
        )
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
