"""Training hooks of Grounding DINO."""

import logging

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["LastGoodCheckpointer"]

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
