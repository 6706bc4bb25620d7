"""
The training steps that ``tools/benchmark.py --train`` times and measures: transformers'
``GroundingDinoForObjectDetection`` with ``labels`` (its own loss) and this project's model with
its criterion, on the same converted weights, the same images, caption and boxes, each followed
by an AdamW step over every parameter.

Every process of the benchmark (the timing one, running all rows, and each row's memory child)
uses the same ``malloc`` settings: by default the project's CPU-training ones
(:func:`~grounding_dino.engine.cpu_allocator.keep_freed_memory`, as ``train_net.py`` applies
them), or glibc's defaults (:func:`use_allocator`). Under glibc's defaults every large
temporary is faulted in again each step, which costs each model system time in proportion to
the memory it allocates per step.
"""

import contextlib
import os
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..precision import precision_context
from .allocated import PeakAllocated

__all__ = [
    "ROWS",
    "TrainingBatch",
    "build_training_steps",
    "load_average",
    "make_training_batch",
    "peak_memory_mb",
    "timed_step",
    "training_memory_child",
    "use_allocator",
]


class Row(NamedTuple):
    """One benchmark row: ``kind`` "hf" (transformers) or "ours"; for ours, the denoising
    queries, the parts whose layers use activation checkpointing (their ``use_checkpoint``),
    whether the deformable attention's backward uses its compiled CPU kernel
    (:mod:`grounding_dino.modeling.native_kernels`) and the Swin stages checkpointed alone."""

    kind: str
    dn_number: int = 0
    checkpointing: Tuple[str, ...] = ()
    native: bool = True
    swin_stages: Tuple[int, ...] = ()  # checkpointed Swin stages, without "backbone" in parts


ROWS = {
    "transformers": Row("hf"),
    "ours (dn off)": Row("ours", 0),
    "ours (dn on)": Row("ours", 100),
    "ours (dn off + checkpointing)": Row("ours", 0, ("enhancer", "decoder")),
    "ours (dn off + checkpointing with Swin)": Row("ours", 0, ("enhancer", "decoder", "backbone")),
    "ours (dn off + pure-PyTorch backward)": Row("ours", 0, (), native=False),
    "ours (dn off + checkpointing Swin stages 0-1)": Row("ours", 0, (), swin_stages=(0, 1)),
}
CHECKPOINTED_PARTS = ("enhancer", "decoder", "backbone")

CAPTION = "a cat . a remote control . a person on the left ."
# Three boxes (x0, y0, x1, y1 as fractions of the image) of the caption's phrases 0, 1, 2.
BOXES = ((0.10, 0.15, 0.45, 0.70), (0.50, 0.40, 0.65, 0.55), (0.05, 0.05, 0.30, 0.95))
PHRASE_SPANS = ((0, 5), (8, 24), (27, 49))  # "a cat", "a remote control", "a person on the left"


class TrainingBatch:
    """One batch in both formats: ``images`` [B, 3, H, W] uint8 RGB, the caption and boxes."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        height, width = images.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        self.boxes_xyxy = torch.tensor(BOXES) * scale  # [3, 4] pixels
        self.classes = torch.arange(len(BOXES))

    def hf_labels(self) -> List[Dict[str, torch.Tensor]]:
        """transformers' ``labels``: per image ``class_labels`` [N] and cxcywh ``boxes`` [N, 4]
        normalised by the image size."""
        height, width = self.images.shape[-2:]
        x0, y0, x1, y1 = (self.boxes_xyxy / torch.tensor([width, height] * 2)).unbind(-1)
        boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
        return [{"class_labels": self.classes, "boxes": boxes} for _ in self.images]

    def ours(self, model) -> List[Dict]:
        """Our training inputs (``image``, ``caption``, ``instances`` with positive maps)."""
        from detectron2.structures import Boxes, Instances

        encoding = model.prompt_encoder.tokenize(CAPTION)
        positive_map = model.prompt_encoder.positive_map(
            CAPTION, [[span] for span in PHRASE_SPANS], encoding
        )
        records = []
        for image in self.images:
            instances = Instances(tuple(image.shape[-2:]))
            instances.gt_boxes = Boxes(self.boxes_xyxy.clone())
            instances.gt_classes = self.classes.clone()
            instances.gt_positive_map = positive_map
            records.append({"image": image, "caption": CAPTION, "instances": instances})
        return records


def make_training_batch(size: Tuple[int, int], batch: int) -> TrainingBatch:
    """``batch`` copies of the benchmark's deterministic image of ``size`` (height, width)."""
    from .reference import make_image

    bgr = make_image(f"{size[0]}x{size[1]}")
    rgb = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)
    return TrainingBatch(rgb.unsqueeze(0).repeat(batch, 1, 1, 1).contiguous())


def _load_hf_model(hf_dir: str):
    """
    transformers' model of ``hf_dir`` with its weights in the process's own memory.

    ``from_pretrained`` maps ``model.safetensors`` and keeps the mapping: the weights would be
    read from the file when first used (the memory "after loading" would leave them out and
    count them in the step's growth) and never be in malloc's allocated bytes, and copies of
    them would be counted twice in the resident size. So the model is built from its config
    and given the file's tensors read into memory; what building it allocated and freed is
    returned to the kernel, as our loader leaves nothing behind.
    """
    import safetensors.torch
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from ..engine.cpu_allocator import return_freed_memory

    model = GroundingDinoForObjectDetection(GroundingDinoConfig.from_pretrained(hf_dir))
    with open(os.path.join(hf_dir, "model.safetensors"), "rb") as file:
        state = safetensors.torch.load(file.read())
    result = model.load_state_dict(state, strict=False)
    tensors = model.state_dict()
    loaded = {tensors[key].data_ptr() for key in state}
    # Keys the file leaves out must be tied to loaded ones (the shared decoder heads).
    untied = [key for key in result.missing_keys if tensors[key].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise RuntimeError(
            f"{hf_dir}: weights missing {untied[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    del state
    return_freed_memory()
    return model


def _hf_step(hf_dir: str, batch: TrainingBatch, device="cpu"):
    from ..text.tokenizer import load_tokenizer, local_bert_dir

    model = _load_hf_model(hf_dir).to(device).train()
    # Losses of every decoder layer and of the encoder's proposals, as our criterion's.
    model.config.auxiliary_loss = True
    text = load_tokenizer(local_bert_dir())([CAPTION] * len(batch.images), return_tensors="pt")
    text = {key: value.to(device) for key, value in text.items()}
    # The processor's normalisation (ImageNet mean and std of [0, 1] pixels).
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixel_values = ((batch.images.float() / 255 - mean) / std).to(device)
    labels = [{k: v.to(device) for k, v in label.items()} for label in batch.hf_labels()]

    def loss() -> torch.Tensor:
        return model(pixel_values=pixel_values, labels=labels, **text).loss

    return model, loss


def _ours_step(out_dir: str, batch: TrainingBatch, device="cpu"):
    from detectron2.utils.events import EventStorage

    from .. import model_zoo

    model = model_zoo.get(os.path.join(out_dir, "config.yaml"), device=device).train()
    for parameter in model.parameters():  # every parameter trainable, as transformers'
        parameter.requires_grad_(True)
    inputs = batch.ours(model)

    def loss() -> torch.Tensor:
        with EventStorage():
            return sum(model(inputs).values())

    return model, loss


def build_training_steps(
    rows,
    hf_dir: str,
    out_dir: str,
    batch: TrainingBatch,
    lr: float = 1e-4,
    device="cpu",
    precision: str = "fp32",
) -> Dict[str, Callable[[], float]]:
    """
    For each benchmark row (keys of :data:`ROWS`, or a mapping like :data:`ROWS` of one's
    own) a function that runs one training step:
    forward with the loss, backward, AdamW step over every parameter, gradients released; it
    returns the loss. Our rows share one model and optimizer (each step sets its denoising and
    checkpointing), so that a process holds at most two models. Models and inputs go to
    ``device``. With ``precision`` "bf16" (or "fp16" on CUDA) the forward and the loss run in
    :func:`~grounding_dino.precision.precision_context` (``torch.autocast``) and the backward
    outside it, as :class:`~grounding_dino.engine.trainer.GroundingAMPTrainer` does; the
    weights and the optimizer stay fp32.

    Raises:
        ValueError: an unknown row; (from a step) a loss that is not finite.
    """
    if not isinstance(rows, dict):
        unknown = [row for row in rows if row not in ROWS]
        if unknown:
            raise ValueError(f"unknown benchmark rows {unknown}; rows: {list(ROWS)}")
        rows = {row: ROWS[row] for row in rows}
    rows = {name: Row(*spec) for name, spec in rows.items()}
    kinds = {spec.kind for spec in rows.values()}
    built = {}
    if "hf" in kinds:
        built["hf"] = _hf_step(hf_dir, batch, device)
    if "ours" in kinds:
        built["ours"] = _ours_step(out_dir, batch, device)
    optimizers = {
        kind: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        for kind, (model, _) in built.items()
    }

    def make_step(row):
        kind, dn_number, checkpointing, native, swin_stages = rows[row]
        model, loss_fn = built[kind]
        optimizer = optimizers[kind]

        def step() -> float:
            if kind == "ours":
                model.dn_number = dn_number
                _set_checkpointing(model, checkpointing, swin_stages)
            optimizer.zero_grad(set_to_none=True)
            with precision_context(precision, device):
                loss = loss_fn()
            if not torch.isfinite(loss):
                raise ValueError(f"{row}: the training loss is {loss.item()}")
            with _native_kernels(native):
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss)

        return step

    return {row: make_step(row) for row in rows}


@contextlib.contextmanager
def _native_kernels(enabled: bool):
    """``GROUNDING_DINO_NATIVE_KERNELS`` set for the block, restored after."""
    from ..modeling.native_kernels import ENABLE_VARIABLE

    before = os.environ.get(ENABLE_VARIABLE)
    os.environ[ENABLE_VARIABLE] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENABLE_VARIABLE]
        else:
            os.environ[ENABLE_VARIABLE] = before


def _outermost_switches(module) -> List:
    """The outermost modules in ``module`` (itself included) with a ``use_checkpoint``: the
    enhancer and decoder themselves, the Swin body inside the backbone (not its stages, which
    the body checkpoints whole)."""
    if hasattr(module, "use_checkpoint"):
        return [module]
    return [found for child in module.children() for found in _outermost_switches(child)]


def _set_checkpointing(model, parts, swin_stages=()) -> None:
    """Activation checkpointing (``use_checkpoint``) on in the model's ``parts``, off in the
    other :data:`CHECKPOINTED_PARTS`, but for ``swin_stages`` (stage indices) of the Swin body
    when the backbone is not in ``parts``."""
    for part in CHECKPOINTED_PARTS:
        if part in parts:
            value = True
        elif part == "backbone" and swin_stages:
            value = tuple(swin_stages)
        else:
            value = False
        switches = _outermost_switches(getattr(model, part))
        if value and not switches:
            raise ValueError(f"{part} has no activation checkpointing (use_checkpoint)")
        for module in switches:
            module.use_checkpoint = value


def use_allocator(glibc_defaults: bool) -> str:
    """
    Sets this process's ``malloc`` for the benchmark: the project's CPU-training settings
    (:func:`~grounding_dino.engine.cpu_allocator.keep_freed_memory`) unless ``glibc_defaults``.
    Call it before building the models, in every process of the benchmark.

    Returns:
        the allocator in words, for the report.
    """
    if glibc_defaults:
        return "malloc: glibc defaults"
    from ..engine.cpu_allocator import keep_freed_memory

    applied = keep_freed_memory()
    if not applied:
        return "malloc: glibc defaults (mallopt unavailable or all set in the environment)"
    return "malloc: train_net.py's CPU settings " + ", ".join(
        f"{name}={value}" for name, value in applied.items()
    )


def timed_step(step: Callable[[], float]) -> Tuple[float, float, float]:
    """``(loss, seconds, cpu_seconds)`` of one call of ``step``: wall time and the process's
    CPU time (all its threads, ``time.process_time``)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    return loss, time.perf_counter() - start, time.process_time() - cpu_start


def training_memory_child(
    row: str,
    hf_dir: str,
    out_dir: str,
    size,
    batch: int,
    timed_steps: int,
    precision: str = "fp32",
):
    """
    In a child process: builds one row (its forward in ``precision``, as
    :func:`build_training_steps`), runs ``timed_steps`` timed steps (at least 1), then one
    more while a thread samples malloc's allocated bytes (:class:`.allocated.PeakAllocated`)
    and torch's ``FlopCounterMode`` counts the step's matrix products (forward, backward and
    what the backward computes again; no module hooks, so it keeps no tensor).
    The steps before it have allocated the optimizer's state, so the sampled step's peak is
    every later step's. The sampler and the counter stay out of the timed steps: with as many
    torch threads as cores the sampler takes a core from them, it holds malloc's lock while it
    walks the heap, and the counter sees every operator in Python.

    Returns:
        ``loaded_mb`` (RSS after building), ``peak_mb`` and ``rss_mb``
        (:func:`peak_memory_mb`), ``allocated_mb`` (the sampled peak), ``gflop`` (the counted
        step's matrix work, 1e9 floating-point operations), the timed steps' ``times``,
        ``cpu_times`` and ``losses``, and ``memory_step_s`` (the sampled step's time).
    """
    if timed_steps < 1:
        raise ValueError(f"timed_steps must be at least 1, got {timed_steps}")
    step = build_training_steps(
        [row], hf_dir, out_dir, make_training_batch(size, batch), precision=precision
    )[row]
    loaded = peak_memory_mb()["rss_mb"]
    times, cpu_times, losses = [], [], []
    for _ in range(timed_steps):
        loss, seconds, cpu_seconds = timed_step(step)
        losses.append(loss)
        times.append(seconds)
        cpu_times.append(cpu_seconds)
    start = time.perf_counter()
    with PeakAllocated() as allocated, FlopCounterMode(display=False) as flops:
        step()
    return {
        "loaded_mb": loaded,
        **peak_memory_mb(),
        "allocated_mb": allocated.peak_mb,
        "gflop": flops.get_total_flops() / 1e9,
        "times": times,
        "cpu_times": cpu_times,
        "losses": losses,
        "memory_step_s": time.perf_counter() - start,
    }


def peak_memory_mb() -> Dict[str, float]:
    """This process's current and peak resident set size (``VmRSS``, ``VmHWM``) in MB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount = line.split(":")
                values[key] = int(amount.split()[0]) / 1024.0
    return {"rss_mb": values.get("VmRSS", float("nan")), "peak_mb": values.get("VmHWM", 0.0)}


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as text."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
