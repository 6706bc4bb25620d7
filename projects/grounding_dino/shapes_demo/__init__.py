"""
The demo job (``make demo``, ``python tools/demo_job.py``): the tiny Grounding DINO of
``shapes_tiny.py`` trained on the synthetic shapes through ``train_net.py``'s driver, evaluated
and drawn (:mod:`.job`); the reuse of a trained model (:mod:`.record`), the data-parallel CPU
training (:mod:`.training`) and the pictures (:mod:`.draw`).
"""

from .draw import draw_predictions, pick_records
from .job import default_config_file, evaluate, load_config, main, parse_args, run_demo
from .record import config_differences, config_record, reuse_decision
from .training import plan_parallelism, train_in_processes, train_model, usable_cores

__all__ = [
    "config_differences",
    "config_record",
    "default_config_file",
    "draw_predictions",
    "evaluate",
    "load_config",
    "main",
    "parse_args",
    "pick_records",
    "plan_parallelism",
    "reuse_decision",
    "run_demo",
    "train_in_processes",
    "train_model",
    "usable_cores",
]
