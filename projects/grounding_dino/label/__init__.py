"""
Auto-labelling at scale: ``python -m grounding_dino.label`` turns a folder of images and a
class list into a COCO detection dataset, across many workers, resumable.

Modules: ``inputs`` (listing), ``model`` (config files -> predictor), ``loader`` (the image
DataLoader), ``worker`` (sharding and the per-process loop), ``parts`` (part files, resume),
``coco`` (the dataset), ``progress`` (one bar over all workers), ``cli`` (the command).
"""
