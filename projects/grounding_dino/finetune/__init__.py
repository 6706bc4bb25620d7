"""
Fine-tuning without forgetting: LoRA adapters (:mod:`.lora`), their merge into plain weights
(:mod:`.merge`) and weight-space ensembling (:mod:`.wise_ft`). The training-side switches
(``train.freeze``, ``train.lora``, replay, ``dataloader.retention``) are applied by the
training driver (``grounding_dino.engine``). Commands::

    python -m grounding_dino.finetune wise-ft CONFIG BASE.pth FINETUNED.pth --output DIR
    python -m grounding_dino.finetune merge-lora CONFIG ADAPTER.pth OUT.pth
"""
