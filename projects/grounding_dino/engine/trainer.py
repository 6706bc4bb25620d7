"""
Training loops: detectron2's :class:`SimpleTrainer` / :class:`AMPTrainer` with full-model
gradient clipping and a stop on non-finite losses before they reach the weights.
"""

import contextlib
import logging
import math
import time
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..data.mapper import put_dropped_scalars

__all__ = ["GroundingTrainer", "GroundingAMPTrainer", "clip_gradients", "nonfinite_losses"]

logger = logging.getLogger(__name__)


def nonfinite_losses(loss_dict: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """The losses of ``loss_dict`` that are NaN or infinite, as {name: value}."""
    if not loss_dict:
        return {}
    values = torch.stack([v.detach().float().sum() for v in loss_dict.values()])
    finite = torch.isfinite(values)
    if bool(finite.all()):  # one device sync in the common case
        return {}
    return {
        name: float(value)
        for name, value, ok in zip(loss_dict, values.tolist(), finite.tolist())
        if not ok
    }


def clip_gradients(parameters, max_norm: float, norm_type: float = 2.0) -> Optional[torch.Tensor]:
    """
    Clips the gradients of all ``parameters`` together (one norm over the whole model, as
    DINO's ``clip_max_norm``).

    Returns:
        the total norm before clipping, or None when no parameter has a gradient.
    """
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.clip_grad_norm_(grads, max_norm, norm_type=norm_type)


class GroundingTrainer(SimpleTrainer):
    """
    :class:`~detectron2.engine.SimpleTrainer` with two additions:

    * the loss dict is checked before the backward pass: a NaN or infinite loss on any
      process raises :class:`FloatingPointError` naming the iteration and the losses, on every
      process (so none waits in a collective), before the weights change; hooks with an
      ``on_nonfinite_loss(iteration)`` method are called first (e.g.
      :class:`~grounding_dino.engine.hooks.LastGoodCheckpointer`);
    * gradients are clipped to ``clip_grad["max_norm"]`` over the whole model, and the norm
      before clipping is logged as ``grad_norm``.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        clip_grad: Optional[Mapping] = None,
        **kwargs,
    ):
        """
        Args:
            model, data_loader, optimizer: as :class:`SimpleTrainer`.
            clip_grad: ``{"enabled": bool, "max_norm": float, "norm_type": float}``
                (``train.clip_grad``, all three keys); None or ``enabled=False`` disables
                clipping. A missing or unknown key (a typo) is an error naming it.
            kwargs: passed to the parent trainer (``gather_metric_period``,
                ``zero_grad_before_forward``; for AMP also ``grad_scaler``, ``precision``).
        """
        super().__init__(model, data_loader, optimizer, **kwargs)
        clip_grad = _check_clip_grad(clip_grad)
        enabled = clip_grad is not None and bool(clip_grad["enabled"])
        self.clip_max_norm = float(clip_grad["max_norm"]) if enabled else None
        self.clip_norm_type = float(clip_grad["norm_type"]) if enabled else 2.0
        if self.clip_max_norm is not None and self.clip_max_norm <= 0:
            raise ValueError(f"train.clip_grad.max_norm must be > 0, got {self.clip_max_norm}")

    # --------------------------------------------------------------------- step parts
    def _autocast(self):
        return contextlib.nullcontext()

    def _backward(self, losses: torch.Tensor) -> None:
        losses.backward()

    def _unscale(self) -> None:
        """Makes the gradients true gradients before clipping (AMP unscales here)."""

    def _optimizer_step(self) -> None:
        self.optimizer.step()

    def run_step(self):
        assert self.model.training, "[GroundingTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        # Annotations the mapper dropped (zero-area boxes, phrases past the token limit, ...):
        # running totals in metrics.json (data/dropped_<reason>).
        if isinstance(data, list):
            put_dropped_scalars([record for record in data if isinstance(record, dict)])

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with self._autocast():
            loss_dict, losses = _total(self.model(data))
        self._check_finite(loss_dict)
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self._backward(losses)
        self.after_backward()
        if self.clip_max_norm is not None:
            self._unscale()
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            norm = clip_gradients(params, self.clip_max_norm, self.clip_norm_type)
            if norm is not None and math.isfinite(float(norm)):  # AMP overflow: step skipped
                get_event_storage().put_scalar("grad_norm", float(norm), smoothing_hint=True)
        self._write_metrics(loss_dict, data_time)
        self._optimizer_step()

    def _check_finite(self, loss_dict: Mapping[str, torch.Tensor]) -> None:
        bad = nonfinite_losses(loss_dict)
        any_bad = bool(bad)
        if comm.get_world_size() > 1:
            device = next(iter(loss_dict.values())).device if loss_dict else torch.device("cpu")
            flag = torch.tensor([float(any_bad)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            any_bad = bool(flag.item() > 0)
        if not any_bad:
            return
        for hook in self._hooks:
            callback = getattr(hook, "on_nonfinite_loss", None)
            if callback is not None:
                callback(self.iter)
        if comm.get_world_size() > 1:
            comm.synchronize()  # the main process finishes saving before any process exits
        where = (
            f"non-finite losses {bad}"
            if bad
            else f"a non-finite loss on another process (rank {comm.get_rank()} is finite)"
        )
        finite = {k: round(float(v.detach()), 6) for k, v in loss_dict.items() if k not in bad}
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration {self.iter}: {where}. The weights were "
            f"not updated with it; the checkpoints written so far are kept. Finite losses: "
            f"{finite}"
        )


class GroundingAMPTrainer(GroundingTrainer, AMPTrainer):
    """
    :class:`GroundingTrainer` with automatic mixed precision, one code path for CUDA (fp16 or
    bf16) and the CPU (bf16): the forward pass and the losses run in ``torch.autocast`` of
    ``device_type`` and ``precision``; the backward pass, the unscaling before clipping and the
    optimizer step go through a gradient scaler, which only float16 needs (its gradients
    underflow without it): for bfloat16 (float32's range) it is a disabled
    ``GradScaler``, whose scale, unscale and step are plain backward and step.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        device_type: str = "cuda",
        precision: torch.dtype = torch.float16,
        grad_scaler=None,
        **kwargs,
    ):
        """
        Args:
            model, data_loader, optimizer, kwargs: as :class:`GroundingTrainer`.
            device_type: the autocast's device type, "cuda" or "cpu" (``train.device``'s).
            precision: torch.float16 (CUDA only) or torch.bfloat16.
            grad_scaler: default: a ``GradScaler`` for ``device_type``, enabled for float16.
        """
        if precision not in (torch.float16, torch.bfloat16):
            raise ValueError(f"precision must be torch.float16 or torch.bfloat16, got {precision}")
        if device_type not in ("cuda", "cpu") or (device_type, precision) == (
            "cpu",
            torch.float16,
        ):
            raise ValueError(
                f"no mixed precision {precision} on {device_type!r}: float16 or bfloat16 on "
                "CUDA, bfloat16 on the CPU"
            )
        if grad_scaler is None:
            grad_scaler = _grad_scaler(device_type, enabled=precision == torch.float16)
        super().__init__(
            model, data_loader, optimizer, grad_scaler=grad_scaler, precision=precision, **kwargs
        )
        self.device_type = device_type

    def _autocast(self):
        return torch.autocast(self.device_type, dtype=self.precision)

    def _backward(self, losses: torch.Tensor) -> None:
        self.grad_scaler.scale(losses).backward()
        if self.log_grad_scaler:
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())

    def _unscale(self) -> None:
        self.grad_scaler.unscale_(self.optimizer)

    def _optimizer_step(self) -> None:
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


def _grad_scaler(device_type: str, enabled: bool):
    """``torch.amp.GradScaler(device_type)`` (torch >= 2.3), else CUDA's."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # pragma: no cover (torch < 2.3)


_CLIP_GRAD_KEYS = ("enabled", "max_norm", "norm_type")


def _check_clip_grad(clip_grad: Optional[Mapping]) -> Optional[Dict]:
    """``train.clip_grad`` as a dict with exactly ``_CLIP_GRAD_KEYS`` (None stays None)."""
    if clip_grad is None:
        return None
    clip_grad = dict(clip_grad)
    missing = [k for k in _CLIP_GRAD_KEYS if k not in clip_grad]
    unknown = sorted(set(clip_grad) - set(_CLIP_GRAD_KEYS))
    if missing or unknown:
        raise KeyError(
            f"train.clip_grad must set exactly {list(_CLIP_GRAD_KEYS)}; missing: {missing}, "
            f"unknown: {unknown}"
        )
    return clip_grad


def _total(output) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return {"total_loss": output}, output
    if not isinstance(output, Mapping) or not output:
        raise TypeError(
            f"The model returned {type(output).__name__} in training; expected a non-empty "
            "dict of scalar losses"
        )
    return dict(output), sum(output.values())
