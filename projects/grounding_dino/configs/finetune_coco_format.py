"""
Fine-tunes Grounding DINO Swin-T on your own COCO-format dataset, from the command line only::

    python -m grounding_dino.convert official groundingdino_swint_ogc.pth weights/swin_t
    python train_net.py --config-file configs/finetune_coco_format.py \\
        dataset.train_json=data/potholes/train.json dataset.train_images=data/potholes/images \\
        dataset.test_json=data/potholes/val.json dataset.test_images=data/potholes/images \\
        train.init_checkpoint=weights/swin_t/model.pth

``dataset`` names the files; its values reach the data loaders by interpolation:

* ``dataset.train_json`` / ``dataset.test_json``: COCO-format annotation files (``images``,
  ``annotations`` with xywh ``bbox``, ``categories``); ``dataset.train_images`` /
  ``dataset.test_images``: the folders their ``file_name`` are relative to. Each is checked
  when the config is instantiated; a missing or empty file or folder is an error naming the key.
* ``dataset.class_names``: the prompt names of the categories, one per category in increasing
  id order, e.g. ``'dataset.class_names=[pothole,"road crack"]'`` for categories named
  "cls_1" and "cls_2"; None (default): the names in the json. Names are cleaned for prompts
  ("traffic_light" -> "traffic light"); the AP table shows them.
* ``dataset.name``: the datasets are registered as ``<name>_train`` and ``<name>_test``.

The defaults, and why (override any of them after the flags):

* **One GPU, batch 4** (``dataloader.train.total_batch_size``): a user's dataset usually
  trains on one card; 4 images of up to 800x1333 with AMP need an estimated 18-20 GB
  (docs/benchmarks.md, "Training memory on a GPU"): where that does not fit, use 2 or
  activation checkpointing, ``--num-gpus N`` for a larger batch.
* **lr 5e-5, backbone 0.1x, BERT frozen**: half the paper's pre-training rate, as
  MM-Detection's Grounding DINO fine-tuning recipe for a small custom dataset; a frozen
  language model keeps the pretrained phrase features (the open vocabulary) and saves memory.
* **3000 iterations** (``train.max_iter``), warm-up 100, LR drop at 3/4: 12 000 images seen,
  12 epochs of a 1000-image dataset. Epochs = max_iter x batch / training images; the schedule
  is in fractions of ``train.max_iter``, so changing it keeps the shape.
* **Evaluation every 500 iterations** and at the end (COCO AP on the test set, the per-category
  table in the log), **checkpoints every 1000** (the 3 newest kept; a Swin-T checkpoint with
  its optimizer state is about 1.2 GB).

Keeping what the model knew (docs/training.md, "Keep what the model knew"), each off by default:

* ``dataloader.retention``: registered test sets evaluated beside yours at every evaluation
  (``'dataloader.retention=[coco_2017_val]'``); results as ``retention/<name>/bbox/AP50``.
* ``train.freeze``: glob patterns of parameters to freeze (``'train.freeze=[backbone.*]'``,
  ``'train.freeze=[enhancer.layers.*.fusion.*]'``).
* ``dataloader.train.dataset.replay``: registered base datasets replayed beside yours, drawn
  at ``dataloader.train.sampler.shares.replay`` (a quarter) of the samples.
* ``train.lora.rank``: > 0 trains LoRA adapters only (rank 8, alpha 16 suggested); the
  checkpoints hold only the adapter (``python -m grounding_dino.finetune merge-lora``).

Results go to ``train.output_dir`` (``./output/finetune_coco_format``): ``model_final.pth``,
``metrics.json``, ``log.txt``, ``config.yaml`` and ``inference/coco_instances_results.json``.
"""

from detectron2.config import LazyCall as L

from grounding_dino.data.datasets import register_coco_format
from grounding_dino.data.replay import get_dataset_dicts_with_replay
from grounding_dino.data.samplers import build_kind_sampler

from .common.data.coco_detection import dataloader
from .common.models.grounding_dino_swin_t import model
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier
from .common.train import train

dataset = dict(
    name="my_dataset",
    train_json=None,  # path of the training annotations (COCO format)
    train_images=None,  # the folder of the training images
    test_json=None,  # path of the test annotations (COCO format)
    test_images=None,  # the folder of the test images
    class_names=None,  # prompt names, one per category in id order; None: the json's names
)

# register_coco_format registers the dataset in the process that instantiates the config (each
# worker of --num-gpus N) and returns its name: the mapper's thing_classes and the evaluator
# reach it through the coco_detection.py interpolations of dataloader.{train,test}.dataset.names.
dataloader.train.dataset.names = L(register_coco_format)(
    name="${dataset.name}_train",
    json_file="${dataset.train_json}",
    image_root="${dataset.train_images}",
    class_names="${dataset.class_names}",
    json_key="dataset.train_json",
    images_key="dataset.train_images",
    class_names_key="dataset.class_names",
)
# Replay: the records of these registered datasets (the base model's training data) follow
# yours, drawn at shares["replay"] of the samples; empty: no replay.
dataloader.train.dataset = L(get_dataset_dicts_with_replay)(
    names=dataloader.train.dataset.names, replay=[]
)
dataloader.train.sampler = L(build_kind_sampler)(
    dataset_dicts="${..dataset}", shares={"replay": 0.25}
)
dataloader.test.dataset.names = L(register_coco_format)(
    name="${dataset.name}_test",
    json_file="${dataset.test_json}",
    image_root="${dataset.test_images}",
    class_names="${dataset.class_names}",
    json_key="dataset.test_json",
    images_key="dataset.test_images",
    class_names_key="dataset.class_names",
)
dataloader.train.total_batch_size = 4
# Retention sets: registered test sets evaluated beside dataloader.test at every evaluation.
dataloader.retention = []

model.text_encoder.freeze = True

optimizer.lr = 5e-5
optimizer.params.backbone_lr_multiplier = 0.1
optimizer.params.text_encoder_lr_multiplier = 0.0  # frozen: model.text_encoder.freeze

lr_multiplier.warmup_iters = 100
lr_multiplier.steps = [0.75]

train.init_checkpoint = "output/converted/swint_ogc/model.pth"
train.output_dir = "./output/finetune_coco_format"
train.max_iter = 3000
train.eval_period = 500
train.checkpointer.period = 1000
train.checkpointer.max_to_keep = 3
# Recipes (engine/recipes.py): parameter-name patterns to freeze; LoRA adapters when rank > 0.
train.freeze = []
train.lora = dict(rank=0, alpha=16.0)
