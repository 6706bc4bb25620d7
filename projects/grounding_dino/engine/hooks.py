"""Training hooks of Grounding DINO."""

import logging
import time

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["LastGoodCheckpointer", "ProgressPrinter", "format_duration"]

logger = logging.getLogger(__name__)


class LastGoodCheckpointer(HookBase):
    """
    Saves ``{name}.pth`` (model, optimizer, scheduler and trainer state) when the trainer
    meets a non-finite loss. :class:`~grounding_dino.engine.trainer.GroundingTrainer` calls
    :meth:`on_nonfinite_loss` before any weight sees the bad loss, so the file holds the state
    after the last good iteration and ``--resume`` continues from there. Only the main
    process writes; periodic checkpoints are left untouched.
    """

    def __init__(self, checkpointer, name: str = "model_last_good"):
        """
        Args:
            checkpointer: a :class:`~fvcore.common.checkpoint.Checkpointer` whose checkpointables
                include the trainer (as the one used for periodic checkpoints).
            name: file name without extension.
        """
        self.checkpointer = checkpointer
        self.name = name

    def on_nonfinite_loss(self, iteration: int) -> None:
        """Saves the state reached after iteration ``iteration - 1``."""
        if not comm.is_main_process():
            return
        trainer = self.trainer
        failed = trainer.iter
        trainer.iter = iteration - 1  # the trainer state must say "done up to iteration - 1"
        try:
            self.checkpointer.save(self.name, iteration=iteration - 1)
        finally:
            trainer.iter = failed
        state = f"after iteration {iteration - 1}" if iteration > 0 else "the initial weights"
        logger.error(
            f"Non-finite loss at iteration {iteration}: saved the last good state ({state}) as "
            f"{self.name}.pth in {self.checkpointer.save_dir}; --resume continues from it"
        )


def format_duration(seconds: float) -> str:
    """``"m:ss"`` of a number of seconds (rounded)."""
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressPrinter(HookBase):
    """
    Prints one line every ``period`` iterations and after the last: the iteration, the
    median ``total_loss`` of the period, the learning rate, the seconds per iteration since
    the training (re)started, the elapsed time and the ETA. Register it on the main process
    only. Example line::

        [train] iter 50/2150  loss 3.217  lr 2.00e-04  0.27 s/it  elapsed 0:14  ETA 9:27
    """

    def __init__(self, max_iter: int, period: int, prefix: str = "[train]"):
        self.max_iter = max_iter
        self.period = period
        self.prefix = prefix
        self._start = None
        self._start_iter = 0

    def before_train(self):
        self._start = time.perf_counter()
        self._start_iter = self.trainer.iter

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self.period and done != self.max_iter:
            return
        elapsed = time.perf_counter() - self._start
        per_iter = elapsed / max(1, done - self._start_iter)
        eta = per_iter * (self.max_iter - done)
        loss = self.trainer.storage.history("total_loss").median(min(self.period, done))
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        print(
            f"{self.prefix} iter {done}/{self.max_iter}  loss {loss:.3f}  lr {lr:.2e}  "
            f"{per_iter:.2f} s/it  elapsed {format_duration(elapsed)}  "
            f"ETA {format_duration(eta)}",
            flush=True,
        )
