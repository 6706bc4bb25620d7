"""
LoRA adapters (``peft``) on the transformer of a Grounding DINO, for fine-tuning with the
base weights frozen (``train.lora`` in a fine-tune config).

Where the adapters go (:data:`LORA_TARGETS`): the attention and FFN projections of the feature
enhancer and the decoder: the image-text fusion's six projections, the deformable attentions'
offsets, attention weights, value and output projections, the multi-head attentions' output
projection and, through peft's ``target_parameters``, their packed ``in_proj_weight`` (the
module reads the parameter itself; peft's ``ParamWrapper`` hands it the adapted one during the
call), and the FFNs' ``linear1`` / ``linear2``. Two of them are read directly instead of being
called: the folded image-text attention (``v_proj``, ``values_v_proj``, ``out_v_proj`` at
inference) and the deformable offsets (``sampling_offsets`` in the pixel-location path). Those
read :func:`~grounding_dino.modeling.utils.linear_weight`, the weight plus the adapter's delta,
so every adapter acts on every path (``tests/test_finetune_lora.py`` checks each one).

A LoRA run's checkpoints hold only the adapter (:class:`AdapterWeights`, peft's state-dict
keys) and a ``"lora"`` record: the settings and the base checkpoint it was trained on.
:func:`merge_adapter_checkpoint` (``python -m grounding_dino.finetune merge-lora``) loads the
base and the adapter strictly and writes plain weights for the predictor and the exports.
"""

import logging
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

__all__ = [
    "LORA_TARGETS",
    "LORA_PARAMETERS",
    "AdapterWeights",
    "check_lora_settings",
    "add_lora",
    "merge_lora",
    "lora_record",
]

logger = logging.getLogger(__name__)

# Module names (the last part of the name) that get an adapter, under ``train.lora.modules``.
LORA_TARGETS = (
    "v_proj",
    "l_proj",
    "values_v_proj",
    "values_l_proj",
    "out_v_proj",
    "out_l_proj",
    "out_proj",
    "linear1",
    "linear2",
    "sampling_offsets",
    "attention_weights",
    "value_proj",
    "output_proj",
)
# Parameters that modules use directly (MultiheadAttention's packed q/k/v projection).
LORA_PARAMETERS = ("in_proj_weight",)
_ADAPTER_NAME = "default"


def check_lora_settings(settings: Mapping) -> Dict:
    """
    Validates ``train.lora``: ``rank`` (int >= 0; 0 turns LoRA off), ``alpha`` (> 0; the update
    is scaled by alpha / rank), ``modules`` (top-level modules that get adapters), ``targets``
    (module names, default :data:`LORA_TARGETS`) and ``parameters`` (parameter names, default
    :data:`LORA_PARAMETERS`).

    Returns:
        the settings as a plain dict.
    """
    known = {"rank", "alpha", "modules", "targets", "parameters"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"train.lora has unknown keys {unknown}; expected {sorted(known)}")
    rank = settings.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"train.lora.rank must be an integer >= 0 (0: off), got {rank!r}")
    alpha = float(settings.get("alpha", 2 * rank))
    if rank and not alpha > 0:
        raise ValueError(f"train.lora.alpha must be > 0, got {alpha}")
    result = dict(
        rank=rank,
        alpha=alpha,
        modules=[str(m) for m in settings.get("modules", ("enhancer", "decoder"))],
        targets=[str(t) for t in settings.get("targets", LORA_TARGETS)],
        parameters=[str(p) for p in settings.get("parameters", LORA_PARAMETERS)],
    )
    if rank and not (result["targets"] or result["parameters"]):
        raise ValueError("train.lora: targets and parameters are both empty")
    return result


def _lora_config(settings: Mapping):
    from peft import LoraConfig

    modules = "|".join(settings["modules"])
    targets = "|".join(settings["targets"])
    return LoraConfig(
        r=settings["rank"],
        lora_alpha=settings["alpha"],
        # A regex is matched against the whole module name.
        target_modules=rf"({modules})\..*\.({targets})" if settings["targets"] else [],
        target_parameters=list(settings["parameters"]) or None,
        lora_dropout=0.0,  # peft's ParamWrapper (in_proj_weight) takes no dropout
        bias="none",
    )


def add_lora(model: nn.Module, settings: Mapping):
    """
    Injects LoRA adapters into ``model`` in place (peft's :class:`LoraModel`); every other
    parameter is frozen. ``settings``: see :func:`check_lora_settings`. Parameters under
    ``train.lora.parameters`` must belong to ``modules``.

    Returns:
        the peft ``LoraModel`` tuner (its ``.model`` is ``model``; :func:`merge_lora` uses it).
    """
    from peft import LoraModel

    settings = check_lora_settings(settings)
    if not settings["rank"]:
        raise ValueError("add_lora: train.lora.rank is 0 (LoRA off)")
    for name, _ in model.named_parameters():
        top = name.split(".", 1)[0]
        if name.rsplit(".", 1)[-1] in settings["parameters"] and top not in settings["modules"]:
            raise ValueError(
                f"train.lora.parameters={settings['parameters']} also matches {name}, outside "
                f"train.lora.modules={settings['modules']}"
            )
    tuner = LoraModel(model, _lora_config(settings), _ADAPTER_NAME)
    adapters = [n for n, _ in model.named_parameters() if ".lora_" in n]
    if not adapters:
        raise ValueError(f"train.lora matched no module or parameter of the model: {settings}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"LoRA rank {settings['rank']} (alpha {settings['alpha']:g}) on "
        f"{len(adapters) // 2} weights of {settings['modules']}: {trainable} trainable "
        f"parameters of {total}"
    )
    return tuner


def merge_lora(tuner) -> nn.Module:
    """
    Folds the adapters into the base weights and removes them (peft's ``merge_and_unload``);
    returns the plain model, with the parameter names of a model that never had adapters.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tuner.model
    # peft unloads a ParamWrapper (in_proj_weight) and loses track of the adapted Linear inside
    # the module it wrapped (out_proj): a second pass reaches those.
    for _ in range(3):
        model = tuner.merge_and_unload()
        if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            return model
    raise RuntimeError("merge_lora: adapter layers remain after merging")


class AdapterWeights(nn.Module):
    """
    The adapter weights of a model with LoRA, as a module of their own for a checkpointer:
    its state dict is peft's adapter state dict (``...linear1.lora_A.weight``), and loading
    fills the adapters. The model itself is held, not registered: the module has no
    parameters of its own, so a checkpoint of it holds nothing else.
    """

    holds_adapter_only = True  # GroundingDINOCheckpointer loads adapter-only checkpoints into it

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["_model"] = model  # not a submodule

    def state_dict(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self._model, adapter_name=_ADAPTER_NAME))

    def load_state_dict(self, state_dict: Mapping, strict: bool = True):
        from peft.utils import set_peft_model_state_dict

        expected = set(self.state_dict())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise ValueError(
                f"Adapter state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        set_peft_model_state_dict(self._model, dict(state_dict), adapter_name=_ADAPTER_NAME)
        return _IncompatibleKeys(missing, unexpected)


def lora_record(settings: Mapping, base_checkpoint: str) -> Dict:
    """The ``"lora"`` entry of a LoRA run's checkpoints: the settings and the base weights."""
    return dict(check_lora_settings(settings), base_checkpoint=str(base_checkpoint))


def adapter_counts(model: nn.Module) -> Tuple[int, List[str]]:
    """(adapter parameters, names of the adapted modules) of a model with LoRA."""
    names = sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n})
    count = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return count, names
