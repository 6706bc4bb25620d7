"""
This project's Grounding DINO against transformers' one (the reference): the two pipelines on
the same random weights (:mod:`.reference`) and the checks of their outputs (:mod:`.checks`);
used by ``tools/benchmark.py`` and its tests.
"""
