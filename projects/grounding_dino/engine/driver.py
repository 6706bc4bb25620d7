"""
The training driver of ``train_net.py`` and of the demo job (``tools/demo_job.py``): the model,
optimizer, data loader, trainer, hooks and checkpointer of a LazyConfig, training from
iteration 0 or resumed, and the evaluation with ``dataloader.evaluator``.

Example::

    from grounding_dino.engine.driver import do_train
    from grounding_dino.model_zoo import get_config

    cfg = get_config("shapes_tiny.py", ["train.max_iter=100", "train.output_dir=/tmp/run"])
    do_train(cfg)                    # model_final.pth, metrics.json... in /tmp/run
    do_train(cfg, resume=True)       # continues from /tmp/run's last checkpoint
"""

import logging
import os
from typing import Dict, Mapping, Optional, Sequence

from detectron2.config import instantiate
from detectron2.engine import HookBase
from torch import nn

from ..checkpoint import GroundingDINOCheckpointer, check_partial
from ..segment.from_config import mask_stage_from_config
from .cpu_allocator import keep_freed_memory
from .dataset_checks import check_dataset_paths
from .defaults import build_hooks, build_trainer, wrap_ddp
from .evaluation import evaluate, write_eval_metrics
from .launch import is_cpu_device
from .recipes import prepare_finetuning
from .retention import retention_config, retention_names, retention_results

__all__ = ["do_test", "do_train", "do_eval_only", "init_partial", "check_init_checkpoint"]

logger = logging.getLogger(__name__)


def do_test(cfg, model: nn.Module) -> Dict:
    """
    Runs ``dataloader.evaluator`` on ``dataloader.test`` without the display threshold
    (:func:`~grounding_dino.engine.evaluate`), with the config's ``mask_stage`` when it sets
    one (masks for the ``mask_eval_max_per_image``, default 100, best boxes of each image:
    ``segm`` AP beside ``bbox``), then on each retention set of
    ``dataloader.retention`` (:mod:`~grounding_dino.engine.retention`); prints and returns
    the results, the retention sets' under ``retention/<name>``.
    """
    stage = mask_stage_from_config(cfg, device=cfg.train.device, dtype="fp32")
    masks = dict(mask_stage=stage, max_masks_per_image=cfg.get("mask_eval_max_per_image", 100))
    results = evaluate(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator), **masks
    )
    for name in retention_names(cfg):
        logger.info(f"Evaluating the retention set {name} (dataloader.retention)")
        copied = retention_config(cfg, name)
        retained = evaluate(
            model,
            instantiate(copied.dataloader.test),
            instantiate(copied.dataloader.evaluator),
            **masks,
        )
        results = {**(results or {}), **retention_results(retained, name)} if retained else results
    return results


def init_partial(cfg):
    """``train.init_partial``: False, True or a list of key prefixes allowed to stay at the
    model's initialisation when ``train.init_checkpoint`` starts a training."""
    if "init_partial" not in cfg.train:
        raise KeyError(
            f"train.init_checkpoint={cfg.train.init_checkpoint} is loaded to start training but "
            "the config does not set train.init_partial: set it to False (the checkpoint must "
            "match the model), True (load what matches) or a list of key prefixes that may "
            'stay at the model\'s initialisation (e.g. ["neck.", "decoder."])'
        )
    return check_partial(cfg.train.init_partial)


class _Fixed:
    """A checkpointable whose state is a fixed value: saved in every checkpoint, ignored when
    one is loaded."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state) -> None:
        pass


def do_train(
    cfg,
    resume: bool = False,
    *,
    model: Optional[nn.Module] = None,
    extra_hooks: Sequence[Optional[HookBase]] = (),
    checkpoint_extra: Optional[Mapping] = None,
) -> nn.Module:
    """
    Builds the optimizer, data loader, trainer, hooks (:func:`~grounding_dino.engine.
    build_hooks`) and checkpointer from ``cfg`` and trains from iteration 0, or with ``resume``
    from the last checkpoint of ``train.output_dir``. ``train.init_checkpoint`` starts the
    training when not resuming (``train.init_partial``). Periodic evaluation runs when the
    config has a ``dataloader.evaluator`` and ``train.eval_period >= 0``.

    Args:
        cfg: the lazy config (``model``, ``optimizer``, ``dataloader``, ``lr_multiplier``,
            ``train``).
        resume: continue from the last checkpoint of ``train.output_dir`` when there is one.
        model: the model to train (already initialised, e.g. after seeding); default: a new
            ``instantiate(cfg.model)``. It is moved to ``train.device`` and trained in place.
        extra_hooks: hooks registered after the standard ones (None entries are skipped);
            the config's own ``train.hooks`` (lazy calls, e.g. the segmenter's
            :class:`~grounding_dino.segment.training.SaveSamFolder`) come last.
        checkpoint_extra: entries saved in every checkpoint of the run beside the model and
            trainer state (e.g. a record of the config); ignored when a checkpoint is loaded.

    Returns:
        the trained model (unwrapped from DistributedDataParallel).

    Raises:
        FileNotFoundError, KeyError, ValueError: a dataset of the run (training, or test when
            it is evaluated) is not registered or misses its files
            (:func:`~grounding_dino.engine.dataset_checks.check_dataset_paths`), before
            anything is built.
    """
    evaluates = "evaluator" in cfg.dataloader and cfg.train.eval_period >= 0
    check_dataset_paths(cfg, ("train", "test") if evaluates else ("train",))
    if model is None:
        model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    if is_cpu_device(cfg.train.device):
        # Freed activations stay in the process for the next step (engine/cpu_allocator.py).
        logger.info("CPU training: malloc settings %s", keep_freed_memory())
    model.to(cfg.train.device)
    # train.freeze / train.lora (engine/recipes.py): before the optimizer sees the parameters.
    recipe = prepare_finetuning(cfg, model, lambda: init_partial(cfg))

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    del cfg.optimizer.params.model  # the config stays serialisable
    train_loader = instantiate(cfg.dataloader.train)

    wrapped = wrap_ddp(model, cfg.train.device, **cfg.train.ddp)
    trainer = build_trainer(cfg.train, wrapped, train_loader, optimizer)
    extra = {**(checkpoint_extra or {}), **recipe.checkpoint_extra}
    extra = {key: _Fixed(value) for key, value in extra.items()}
    # Under LoRA the checkpoints hold the adapter weights only.
    checkpointer = GroundingDINOCheckpointer(
        recipe.checkpoint_model or wrapped, cfg.train.output_dir, trainer=trainer, **extra
    )
    # train.eval_period: evaluate every so many iterations and after the last (0: only after
    # the last; < 0: never).
    eval_period = cfg.train.eval_period
    if "evaluator" not in cfg.dataloader:
        logger.warning("The config has no dataloader.evaluator: training without evaluation")
    elif eval_period < 0:
        logger.info(f"train.eval_period={eval_period}: training without evaluation")
    eval_function = (lambda: do_test(cfg, wrapped)) if evaluates else None
    trainer.register_hooks(
        build_hooks(cfg.train, instantiate(cfg.lr_multiplier), checkpointer, eval_function)
        + list(extra_hooks)
        + [instantiate(hook) for hook in (cfg.train.get("hooks") or [])]
    )

    resuming = resume and checkpointer.has_checkpoint()
    partial = init_partial(cfg) if cfg.train.init_checkpoint and not resuming else False
    if resuming or not recipe.base_loaded:
        checkpointer.resume_or_load(
            cfg.train.init_checkpoint, resume=resume, partial=partial, convert_sources=True
        )
    # A resumed checkpoint holds the iteration it was saved after; continue with the next one.
    start_iter = trainer.iter + 1 if resuming else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return model


def do_eval_only(cfg, resume: bool = False) -> Dict:
    """
    Evaluates ``train.init_checkpoint`` (with ``resume``: the last checkpoint of
    ``train.output_dir``), which must match the model exactly; appends the results to
    ``train.output_dir/metrics.json`` at the checkpoint's iteration (0 for a checkpoint
    without one, e.g. a converted one).
    """
    if "evaluator" not in cfg.dataloader:
        raise KeyError("--eval-only: the config has no dataloader.evaluator to evaluate with")
    check_dataset_paths(cfg, ("test",))
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    # No DistributedDataParallel: inference needs no gradient synchronisation; each process
    # evaluates its shard of dataloader.test and the evaluator gathers the results.
    checkpointer = GroundingDINOCheckpointer(model, cfg.train.output_dir)
    extra = checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    results = do_test(cfg, model)
    if "iteration" in extra:
        iteration = int(extra["iteration"])
    else:
        iteration = 0
        logger.info("The checkpoint holds no iteration: metrics.json gets iteration 0")
    write_eval_metrics(results, cfg.train.output_dir, iteration)
    return results


def check_init_checkpoint(cfg, resume: bool, eval_only: bool = False) -> None:
    """
    Fails early (before any data is read) when ``train.init_checkpoint`` names a missing
    file that would be loaded: without ``resume`` or when ``train.output_dir`` has no
    checkpoint to resume from; with ``eval_only`` also when it is empty (the model's random
    initialisation would be evaluated).
    """
    if resume and os.path.isfile(os.path.join(cfg.train.output_dir, "last_checkpoint")):
        return
    path = cfg.train.init_checkpoint
    if eval_only and not path:
        raise ValueError(
            "--eval-only with an empty train.init_checkpoint would evaluate the model's random "
            "initialisation; set train.init_checkpoint=PATH (or --resume with a checkpoint in "
            f"train.output_dir={cfg.train.output_dir})"
        )
    if path and "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(
            f"train.init_checkpoint={path} does not exist; convert an official checkpoint "
            'first (python -m grounding_dino.convert) or set train.init_checkpoint="" to '
            "start from the model's own initialisation"
        )
