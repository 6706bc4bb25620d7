"""Small random transformers segmenters (SAM, SAM-HQ, SAM 2) saved as local folders, for the
mask-stage tests. Every parameter is perturbed so that no 0/1 initialisation hides a bug.

The processors are configured for the tiny models' input size (``IMAGE_SIZE`` instead of
1024): SAM's ``SamImageProcessor(size={"longest_edge": S}, pad_size={"height": S, "width": S})``
and SAM 2's ``Sam2ImageProcessorFast(size={"height": S, "width": S})`` with
``Sam2Processor(target_size=S)``, so that the models' embedding grids match and the tests run
in seconds."""

import torch

__all__ = [
    "IMAGE_SIZE",
    "tiny_sam_config",
    "tiny_sam_hq_config",
    "tiny_sam2_config",
    "perturbed",
    "save_segmenter",
    "tiny_segmenter_folder",
]

IMAGE_SIZE = 64
_PATCH = 16


def tiny_sam_config(hq: bool = False, image_size: int = IMAGE_SIZE):
    """A SamConfig (or SamHQConfig) with a 2-layer ViT of width 32 on ``image_size`` pixels."""
    if hq:
        from transformers import SamHQConfig as Config
        from transformers import SamHQMaskDecoderConfig as DecoderConfig
        from transformers import SamHQPromptEncoderConfig as PromptConfig
        from transformers import SamHQVisionConfig as VisionConfig
    else:
        from transformers import SamConfig as Config
        from transformers import SamMaskDecoderConfig as DecoderConfig
        from transformers import SamPromptEncoderConfig as PromptConfig
        from transformers import SamVisionConfig as VisionConfig
    hidden = 32
    vision = VisionConfig(
        hidden_size=32,
        output_channels=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=_PATCH,
        window_size=2,
        global_attn_indexes=[1],
        num_pos_feats=hidden // 2,
        mlp_dim=64,
    )
    prompt = PromptConfig(
        hidden_size=hidden, image_size=image_size, patch_size=_PATCH, mask_input_channels=4
    )
    decoder_kwargs = dict(
        hidden_size=hidden,
        mlp_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        iou_head_hidden_dim=32,
    )
    if hq:
        decoder_kwargs["vit_dim"] = 32
    decoder = DecoderConfig(**decoder_kwargs)
    return Config(
        vision_config=vision.to_dict(),
        prompt_encoder_config=prompt.to_dict(),
        mask_decoder_config=decoder.to_dict(),
    )


def tiny_sam_hq_config(image_size: int = IMAGE_SIZE):
    return tiny_sam_config(hq=True, image_size=image_size)


def tiny_sam2_config(image_size: int = 2 * IMAGE_SIZE):
    """A Sam2Config with a 4-stage Hiera of 1, 1, 2, 1 blocks (widths 16..128), FPN width 32."""
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    hidden = 32
    dims = [16, 32, 64, 128]
    backbone = Sam2HieraDetConfig(
        hidden_size=dims[0],
        image_size=[image_size, image_size],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 2],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
    )
    stride = image_size // 4
    vision = Sam2VisionConfig(
        backbone_config=backbone.to_dict(),
        backbone_channel_list=dims[::-1],
        backbone_feature_sizes=[[stride >> level] * 2 for level in range(3)],
        fpn_hidden_size=hidden,
    )
    prompt = Sam2PromptEncoderConfig(
        hidden_size=hidden, image_size=image_size, patch_size=_PATCH, mask_input_channels=4
    )
    decoder = Sam2MaskDecoderConfig(
        hidden_size=hidden, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
    )
    return Sam2Config(
        vision_config=vision.to_dict(),
        prompt_encoder_config=prompt.to_dict(),
        mask_decoder_config=decoder.to_dict(),
    )


def perturbed(model, seed: int = 0, scale: float = 0.25):
    """Adds seeded noise to every parameter and floating buffer (in place); eval mode. The
    scale gives the tiny models mask logits of a few units, of both signs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + [
            b for b in model.buffers() if b.is_floating_point()
        ]:
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    return model.eval()


def _processor(kind: str, image_size: int):
    if kind == "sam2":
        from transformers import Sam2ImageProcessorFast, Sam2Processor

        size = {"height": image_size, "width": image_size}
        return Sam2Processor(Sam2ImageProcessorFast(size=size), target_size=image_size)
    from transformers import SamHQProcessor, SamImageProcessor, SamProcessor

    image_processor = SamImageProcessor(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": image_size // 4},
        mask_pad_size={"height": image_size // 4, "width": image_size // 4},
    )
    return (SamHQProcessor if kind == "sam_hq" else SamProcessor)(image_processor)


def build_segmenter(kind: str, seed: int = 0):
    """A perturbed random model of ``kind`` ("sam", "sam_hq", "sam2") and its processor."""
    from transformers import Sam2Model, SamHQModel, SamModel

    config, model_class = {
        "sam": (tiny_sam_config, SamModel),
        "sam_hq": (tiny_sam_hq_config, SamHQModel),
        "sam2": (tiny_sam2_config, Sam2Model),
    }[kind]
    config = config()
    torch.manual_seed(seed)
    model = perturbed(model_class(config), seed)
    image_size = config.prompt_encoder_config.image_size
    return model, _processor(kind, image_size)


def save_segmenter(model, processor, folder) -> str:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def tiny_segmenter_folder(kind: str, folder, seed: int = 0):
    """Builds, perturbs and saves a tiny segmenter; returns ``(model, processor, folder)``."""
    model, processor = build_segmenter(kind, seed)
    return model, processor, save_segmenter(model, processor, folder)
