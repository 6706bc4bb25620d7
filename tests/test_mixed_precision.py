"""
Mixed-precision training and the float16 overflow guards.

- A bf16 autocast training step on the CPU runs through the trainer ``train_net.py`` builds
  (:func:`grounding_dino.engine.build_trainer` from ``train.amp``), the same
  :class:`GroundingAMPTrainer` code as CUDA AMP: its losses are within a stated tolerance of
  float32's on the same batch, its gradients are finite, and a few iterations lower the loss.
- The image-text attention of the enhancer has the reference's guards (the logits minus their
  maximum, clamped to +-50000): equal to the official ``BiMultiHeadAttention`` where the clamps
  act, and finite in float16 where the reference's own float16 logits overflow.
"""

import itertools

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

from grounding_dino.engine import GroundingAMPTrainer, amp_precision, build_trainer
from grounding_dino.modeling import attention
from grounding_dino.modeling.attention import LOGIT_BOUND, BiMultiHeadAttention
from grounding_dino.precision import cpu_has_native_bf16
from test_train_net import batch, write_fixture

# bf16 autocast losses against float32's on the same batch, weights and denoising noise (tiny
# model, 96x128 images; bf16 keeps 8 bits of mantissa). The denoising losses, whose queries and
# targets are fixed, differ by about 0.1% (measured): tolerance 1%. The losses after the
# Hungarian matching can differ far more where bf16 rounding changes which query is matched
# (30% on the box losses of this batch), so the total is held to 5% (measured 1.4%).
BF16_DENOISING_RTOL = 0.01
BF16_TOTAL_RTOL = 0.05

CPU_BF16 = {"device": "cpu", "amp": {"enabled": True, "dtype": "auto"}, "clip_grad": None}


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    return LazyConfig.load(write_fixture(str(tmp_path_factory.mktemp("amp"))))


def _model_and_trainer(cfg, train_overrides):
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    del cfg.optimizer.params.model
    train = {**dict(cfg.train), **train_overrides}
    records = batch(model.tokenizer, torch.Generator().manual_seed(0))
    return model, build_trainer(train, model, itertools.repeat(records), optimizer), records


def _losses(model, records, autocast):
    torch.manual_seed(1)  # the same denoising noise
    with EventStorage(), autocast:
        return {k: float(v) for k, v in model(records).items()}


def test_amp_settings_from_the_config():
    assert amp_precision(CPU_BF16) == ("cpu", torch.bfloat16)
    assert amp_precision({**CPU_BF16, "amp": {"enabled": True, "dtype": "bf16"}})[1] is (
        torch.bfloat16
    )
    assert amp_precision({**CPU_BF16, "amp": {"enabled": "auto", "dtype": "bf16"}}) is None
    assert amp_precision({**CPU_BF16, "amp": {"enabled": False, "dtype": "auto"}}) is None
    # A config without amp.dtype (written before it existed) on CUDA: detectron2's fp16.
    assert amp_precision({"device": "cuda", "amp": {"enabled": "auto"}}) == ("cuda", torch.float16)


def test_amp_refusals_name_the_setting(monkeypatch):
    with pytest.raises(ValueError, match="train.amp.dtype=fp16 on train.device=cpu.*fp16"):
        amp_precision({"device": "cpu", "amp": {"enabled": True, "dtype": "fp16"}})
    with pytest.raises(ValueError, match="train.amp.dtype must be 'fp16', 'bf16' or 'auto'"):
        amp_precision({"device": "cpu", "amp": {"enabled": True, "dtype": "half"}})
    # A CPU without native bfloat16 (held to AVX2 here by oneDNN's variable): refused unless
    # asked for, as inference's --dtype bf16.
    cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("GROUNDING_DINO_ALLOW_EMULATED_BF16", raising=False)
    try:
        with pytest.raises(ValueError, match="train.amp.enabled=True .*would be emulated"):
            amp_precision(CPU_BF16)
        monkeypatch.setenv("GROUNDING_DINO_ALLOW_EMULATED_BF16", "1")
        assert amp_precision(CPU_BF16) == ("cpu", torch.bfloat16)
    finally:
        cpu_has_native_bf16.cache_clear()


def test_bf16_training_step_on_the_cpu_through_the_amp_trainer(tiny_cfg):
    model, trainer, records = _model_and_trainer(tiny_cfg, CPU_BF16)
    assert type(trainer) is GroundingAMPTrainer
    assert (trainer.device_type, trainer.precision) == ("cpu", torch.bfloat16)
    assert not trainer.grad_scaler.is_enabled()  # bf16 needs no loss scaling

    fp32 = _losses(model, records, torch.autocast("cpu", enabled=False))
    bf16 = _losses(model, records, trainer._autocast())
    assert fp32.keys() == bf16.keys()
    denoising = [name for name in fp32 if "_dn" in name]
    assert denoising
    for name in denoising:
        assert bf16[name] == pytest.approx(fp32[name], rel=BF16_DENOISING_RTOL), name
    assert sum(bf16.values()) == pytest.approx(sum(fp32.values()), rel=BF16_TOTAL_RTOL)
    assert bf16 != fp32  # autocast did run in bf16

    losses = []
    trainer.register_hooks([_RecordLoss(losses)])
    trainer.train(0, 5)  # five steps on the same batch
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(torch.isfinite(g).all() for g in grads.values())  # the last step's
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


class _RecordLoss(HookBase):
    def __init__(self, losses):
        self.losses = losses

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())


# ------------------------------------------------------------------ float16 overflow guards
def _attention_pair():
    official = pytest.importorskip("groundingdino.models.GroundingDINO.fuse_modules")
    torch.manual_seed(0)
    ours = BiMultiHeadAttention(v_dim=32, l_dim=24, embed_dim=64, num_heads=4, dropout=0.0)
    reference = official.BiMultiHeadAttention(
        v_dim=32, l_dim=24, embed_dim=64, num_heads=4, dropout=0.0
    )
    reference.load_state_dict(ours.state_dict())
    return ours.eval(), reference.eval()


def _large_inputs(scale):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 50, 32, generator=generator) * scale
    text = torch.randn(2, 7, 24, generator=generator) * scale
    image_mask = torch.ones(2, 50, dtype=torch.bool)
    image_mask[1, 40:] = False
    text_mask = torch.ones(2, 7, dtype=torch.bool)
    text_mask[0, 5:] = False
    return image, text, image_mask, text_mask


@torch.no_grad()
def test_bi_attention_clamps_equal_the_reference_where_they_act(monkeypatch):
    ours, reference = _attention_pair()
    image, text, image_mask, text_mask = _large_inputs(150.0)
    query = ours.v_proj(image).view(2, 50, 4, 16)
    key = ours.l_proj(text).view(2, 7, 4, 16)
    logits = torch.einsum("bshd,blhd->bshl", query, key) / 4
    assert ((logits - logits.max()) < -LOGIT_BOUND).float().mean() > 0.3  # the clamps act
    expected = reference(image, text, attention_mask_v=~image_mask, attention_mask_l=~text_mask)
    for path in (ours._forward_folded, ours._forward_projected):
        for got, want in zip(path(image, text, image_mask, text_mask), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
    # Without the clamps the same inputs give other outputs: the test sees them.
    monkeypatch.setattr(attention, "LOGIT_BOUND", float("inf"))
    unclamped = ours(image, text, image_mask, text_mask)
    assert (unclamped[0] - expected[0]).abs().max() > 1.0


@torch.no_grad()
def test_bi_attention_stays_finite_in_float16_where_the_logits_overflow():
    ours, reference = _attention_pair()
    image, text, image_mask, text_mask = _large_inputs(400.0)
    fp32 = ours(image, text, image_mask, text_mask)
    half_inputs = (image.half(), text.half(), image_mask, text_mask)
    # The reference in float16 computes its logits in float16: they pass 65504 and its
    # outputs are not finite. This attention computes them in float32.
    official_half = reference.half()(
        half_inputs[0], half_inputs[1], attention_mask_v=~image_mask, attention_mask_l=~text_mask
    )
    assert not all(torch.isfinite(x).all() for x in official_half)
    ours_half = BiMultiHeadAttention(v_dim=32, l_dim=24, embed_dim=64, num_heads=4, dropout=0.0)
    ours_half.load_state_dict(ours.state_dict())
    ours_half.eval().half()
    for path in (ours_half._forward_folded, ours_half._forward_projected):
        outputs = path(*half_inputs)
        for got, want in zip(outputs, fp32):
            assert got.dtype == torch.float16 and torch.isfinite(got).all()
            assert (got.float() - want).abs().max() <= 0.01 * want.abs().max()
    # float16 autocast over a float32 module: the same guard.
    with torch.autocast("cpu", dtype=torch.float16):
        outputs = ours(image, text, image_mask, text_mask)
    assert all(torch.isfinite(x).all() for x in outputs)
