"""
Common training settings (detectron2's ``configs/common/train.py`` keys, plus
``clip_grad`` and ``save_last_good``). Used as ``from .common.train import train``.
"""

train = dict(
    output_dir="./output",
    # A converted official checkpoint to start from (see projects/grounding_dino/convert),
    # e.g. "output/converted/swint_ogc/model.pth". Empty: the model's own initialisation.
    init_checkpoint="",
    # True, or key prefixes allowed to stay at their initialisation: train.init_checkpoint may
    # then cover only part of the model (e.g. an ImageNet backbone). False: it must match exactly.
    init_partial=False,
    max_iter=90000,
    # Mixed precision: enabled="auto" is AMP on a CUDA train.device and float32 on the CPU;
    # True asks for AMP on either (the CPU: bf16 autocast, refused on a CPU without native
    # bfloat16 unless GROUNDING_DINO_ALLOW_EMULATED_BF16=1), False for float32. dtype: "fp16"
    # (CUDA only, with a gradient scaler), "bf16", or "auto" (fp16 on CUDA, bf16 on the CPU).
    amp=dict(enabled="auto", dtype="auto"),
    ddp=dict(  # options of DistributedDataParallel (create_ddp_model)
        broadcast_buffers=False,
        find_unused_parameters=False,
        fp16_compression=False,
    ),
    checkpointer=dict(period=5000, max_to_keep=100),  # options of PeriodicCheckpointer
    eval_period=5000,  # 0: evaluate only after the last iteration; < 0: never
    log_period=20,
    device="cuda",  # "cpu" trains on the CPU (gloo between processes)
    # One gradient norm over the whole model, as DINO's clip_max_norm.
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),
    # Save model_last_good.pth (state before the failing step) when a loss is NaN/inf.
    save_last_good=True,
    seed=-1,  # < 0: a random seed per run
)
