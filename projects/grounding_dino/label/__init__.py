"""
Auto-labelling at scale: ``python -m grounding_dino.label`` turns a folder of images and a
class list into a COCO detection dataset, across many workers, resumable.

Modules: ``cli`` (the command), ``run`` (checks a run, starts its workers, merges their part
files), ``worker`` (sharding and the per-process loop), ``digests`` (what ties a run to its
config and weights). The files it reads and writes are the library's
(:mod:`grounding_dino.io`: input listing, the image DataLoader, part files and their progress
bar, COCO writing).
"""
