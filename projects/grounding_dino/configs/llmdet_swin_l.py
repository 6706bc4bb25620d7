"""LLMDet Swin-L (iSEE-Laboratory/LLMDet, fine-tuned from MM-Grounding-DINO Swin-L with a
large language model's supervision): at inference the MM-Grounding-DINO Swin-L model, which
this config imports. LLMDet's language-model branch (``lmm``, its connectors) is used in
training only; ``python -m grounding_dino.convert`` drops it and names what it dropped.
LLMDet's published LVIS numbers use 40 classes per prompt (its ``test_cfg.chunked_size``);
see docs/model_zoo.md."""

from .mm_grounding_dino_swin_l import model, train

train.output_dir = "./output/llmdet_swin_l"
