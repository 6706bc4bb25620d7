"""The web demo's Gradio app (:mod:`grounding_dino.web.app`), served by ``demo/web.py``.

Importing :mod:`grounding_dino.web.app` imports Gradio (``requirements.txt``); this package
itself imports nothing.
"""
