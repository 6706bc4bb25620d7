"""Small transformers Grounding DINO configurations for tests and the benchmark's --tiny."""

__all__ = ["tiny_hf_config"]


def tiny_hf_config(
    d_model: int = 64, num_queries: int = 30, model_type: str = "grounding-dino", **overrides
):
    """A small but complete transformers ``GroundingDinoConfig`` (Swin + BERT, 2+2 layers);
    ``model_type="mm-grounding-dino"``: the same sizes as an ``MMGroundingDinoConfig``."""
    from transformers import BertConfig, GroundingDinoConfig, MMGroundingDinoConfig, SwinConfig

    backbone = SwinConfig(
        embed_dim=32,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=7,
        out_indices=[2, 3, 4],
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=30522,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        max_position_embeddings=512,
    )
    args = dict(
        backbone_config=backbone,
        text_config=text,
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=num_queries,
        fusion_dropout=0.0,
        fusion_droppath=0.0,
    )
    args.update(overrides)
    config_classes = {
        "grounding-dino": GroundingDinoConfig,
        "mm-grounding-dino": MMGroundingDinoConfig,
    }
    if model_type not in config_classes:
        raise ValueError(f"model_type must be one of {sorted(config_classes)}, got {model_type!r}")
    return config_classes[model_type](**args)
