"""
Zero-shot LVIS v1 minival with the official Swin-T weights (the paper's 27.4 AP).

    python train_net.py --config-file configs/zeroshot_lvis_swin_t.py --eval-only \\
        train.init_checkpoint=weights/swin_t/model.pth train.device=cuda

The 1203 category names do not fit one 256-token prompt: the model splits them into chunks,
scores each chunk (one text/enhancer/decoder pass per chunk, one backbone pass per image) and
keeps the top ``model.max_detections`` (query, category) pairs over all chunks. AP is the lvis
API's with fixed AP (top 10,000 detections per category over the dataset).

``model.prompt_encoder.classes_per_prompt`` picks the protocol: None (as many classes per
chunk as fit in 256 tokens, the paper's 27.4 for Swin-T) or 40 (mmdetection's, 28.8 for the
same weights); docs/evaluation.md.
"""

from .zeroshot_coco_swin_t import dataloader, model, train

dataloader.test.dataset.names = "lvis_v1_minival"
dataloader.evaluator.max_dets_per_image = 300
dataloader.evaluator.fixed_ap = True
dataloader.evaluator.topk_per_class = 10000
model.max_detections = 300
model.prompt_encoder.classes_per_prompt = None  # 40: mmdetection's LVIS protocol
train.output_dir = "./output/zeroshot_lvis_swin_t"
