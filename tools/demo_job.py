"""
The offline main job (``make demo``): trains the tiny Grounding DINO of ``configs/shapes_tiny.py``
from scratch on the CPU on the synthetic shapes datasets through ``train_net.py``'s driver,
evaluates it and draws its predictions; see :mod:`grounding_dino.shapes_demo.job` for what it
writes under ``--output`` and when a second run reuses the trained model. Examples::

    python tools/demo_job.py                      # make demo
    python tools/demo_job.py --retrain --max-iter 500
    python tools/demo_job.py --output /tmp/d --max-iter 3 --num-train 8 --num-val 4
    python tools/demo_job.py optimizer.lr=1e-4    # config overrides at the end
"""

import sys

from grounding_dino.shapes_demo import main

if __name__ == "__main__":
    main(sys.argv[1:])
