"""
The synthetic "shapes" grounding data, in parts: generation parameters (``config``), drawing
(``drawing``), scene layouts (``sampling``), referring expressions (``expressions``) and the
splits on disk (``splits``). ``grounding_dino.data.synthetic`` registers the datasets and
re-exports the public names.
"""
