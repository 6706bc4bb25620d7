"""
Reading the inputs and writing the outputs of the programs (``demo/demo.py``, the web demo,
``python -m grounding_dino.label``), as library functions they share:

- :mod:`~grounding_dino.io.inputs`: folders, globs and list files -> image and video paths,
  their names under a root folder, and where their drawings go.
- :mod:`~grounding_dino.io.images`: the one reader of image files (limits checked from the
  header, EXIF orientation, every mode to 8-bit RGB/BGR, :class:`ImageReadError` naming the file
  and the reason), a video's frames, and the DataLoader whose worker processes decode images
  while the model runs; :mod:`~grounding_dino.io.processes` makes such children die with
  their parent and drop its locks.
- :mod:`~grounding_dino.io.coco_files`: COCO datasets and results from predictor outputs; JSON
  written atomically, or record by record (:class:`~grounding_dino.io.coco_files.JsonListWriter`).
- :mod:`~grounding_dino.io.parts`: part files, the crash-safe record of a run sharded over
  workers, from which it resumes; :mod:`~grounding_dino.io.progress` shows one bar over them.
- :mod:`~grounding_dino.io.detect_files`: a predictor over image and video files, each drawn
  and its detections appended to a COCO-results list.
"""
