#!/usr/bin/env python
"""
Fine-tuning without forgetting, measured end to end on the CPU (run once; not part of
``make demo``). From the ``make demo`` model, fine-tunes on a held-out shapes-like dataset
with four new class names (cyan/pink hexagon/triangle: two colours and a shape the demo never
saw) through ``configs/finetune_coco_format.py``, once per recipe:

* ``full``: what the config trains (BERT frozen, as in the demo model);
* ``freeze backbone``: ``train.freeze=[backbone.*]``;
* ``freeze fusion``: ``train.freeze=[enhancer.layers.*.fusion.*]``;
* ``replay``: ``dataloader.train.dataset.replay=[shapes_train]`` at a quarter of the samples;
* ``LoRA``: ``train.lora.rank=8`` (a higher learning rate, as LoRA usually needs);

and measures on each the target AP50, the retention AP50 on ``shapes_val`` (its 24 classes,
prompted as the demo evaluates them; ``dataloader.retention``), the trainable parameters and
the size of ``model_final.pth``. Then WiSE-FT between the demo model and the full fine-tune
(``grounding_dino.finetune.wise_ft``). Writes ``OUTPUT/results.{json,md}``,
``OUTPUT/tradeoff.png`` (the WiSE-FT curve with the recipes as points) and each run's folder::

    python tools/finetune_retention.py --demo-dir output/demo --output output/retention
    python tools/finetune_retention.py --demo-dir output/demo --output /tmp/r --max-iter 3 \\
        --num-train 8 --num-val 4 --recipes full lora --alphas 0,1      # a smoke run
"""

import argparse
import json
import logging
import os
import sys
import time

from detectron2.config import LazyConfig

from grounding_dino.data.synthetic import register_shapes_datasets
from grounding_dino.engine import ProgressPrinter, do_train
from grounding_dino.engine.recipes import trainable_parameters
from grounding_dino.finetune.report import draw_curve, table
from grounding_dino.finetune.wise_ft import run_wise_ft
from grounding_dino.io.atomic import atomic_file
from grounding_dino.model_zoo import get_config
from grounding_dino.shapes_demo.training import seed_everything

# name -> (config overrides, learning rate)
RECIPES = {
    "full": ([], 1e-4),
    "freeze backbone": (["train.freeze=[backbone.*]"], 1e-4),
    "freeze fusion": (["train.freeze=[enhancer.layers.*.fusion.*]"], 1e-4),
    "replay": (["dataloader.train.dataset.replay=[shapes_train]"], 1e-4),
    "LoRA": (["train.lora.rank=8", "train.lora.alpha=16"], 5e-4),
}
NEW_DATA = dict(colors=("cyan", "pink"), shapes=("hexagon", "triangle"), unseen_fraction=0.0)
METRIC = "bbox/AP50"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-dir", required=True, help="make demo's output (model_final.pth)")
    parser.add_argument("--output", required=True, help="a new folder for the runs and results")
    parser.add_argument("--max-iter", type=int, default=300, help="iterations per fine-tune")
    parser.add_argument("--num-train", type=int, default=400, help="held-out train images")
    parser.add_argument("--num-val", type=int, default=100, help="held-out val images")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="WiSE-FT mixing weights")
    parser.add_argument("--max-target-loss", type=float, default=1.0, help="WiSE-FT choice")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.error(f"--output {args.output} exists; nothing is overwritten, choose a new one")
    for name in ("model_final.pth", "config.yaml", "shapes"):
        if not os.path.exists(os.path.join(args.demo_dir, name)):
            parser.error(f"--demo-dir {args.demo_dir} has no {name}: run make demo first")
    return args


def finetune_config(args, demo_cfg, data, name, output_dir):
    """configs/finetune_coco_format.py on the new data, with the demo's model and image size."""
    overrides, lr = RECIPES[name]
    cfg = get_config(
        "finetune_coco_format.py",
        [
            f"dataset.train_json={data['train']}/coco.json",
            f"dataset.train_images={data['train']}/images",
            f"dataset.test_json={data['val']}/coco.json",
            f"dataset.test_images={data['val']}/images",
            "dataset.name=newshapes",
            "dataloader.retention=[shapes_val]",
            f"train.init_checkpoint={os.path.join(args.demo_dir, 'model_final.pth')}",
            f"train.output_dir={output_dir}",
            f"train.max_iter={args.max_iter}",
            "train.device=cpu",
            "train.eval_period=0",  # evaluate after the last iteration
            "train.checkpointer.period=0",  # only model_final.pth
            f"train.log_period={max(1, min(20, args.max_iter))}",
            "train.seed=0",
            f"optimizer.lr={lr}",
            "optimizer.params.backbone_lr_multiplier=1.0",  # the demo trains its CNN fully
            f"lr_multiplier.warmup_iters={max(1, args.max_iter // 10)}",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
            *overrides,
        ],
    )
    cfg.model = demo_cfg.model
    cfg.dataloader.train.mapper.augmentations = demo_cfg.dataloader.train.mapper.augmentations
    cfg.dataloader.train.mapper.max_categories = demo_cfg.dataloader.train.mapper.max_categories
    cfg.dataloader.test.mapper.augmentations = demo_cfg.dataloader.test.mapper.augmentations
    cfg.dataloader.test.batch_size = demo_cfg.dataloader.test.batch_size
    return cfg, lr


def last_evaluation(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        lines = [json.loads(line) for line in f if METRIC in line]
    return lines[-1]


def run_recipe(args, demo_cfg, data, name):
    output_dir = os.path.join(args.output, name.replace(" ", "_"))
    cfg, lr = finetune_config(args, demo_cfg, data, name, output_dir)
    os.makedirs(output_dir)
    LazyConfig.save(cfg, os.path.join(output_dir, "config.yaml"))
    seed_everything(0)
    start = time.perf_counter()
    progress = ProgressPrinter(args.max_iter, max(1, args.max_iter // 5), prefix=f"[{name}]")
    model = do_train(cfg, extra_hooks=[progress])
    minutes = (time.perf_counter() - start) / 60
    scores = last_evaluation(output_dir)
    final = os.path.join(output_dir, "model_final.pth")
    return dict(
        recipe=name,
        lr=lr,
        target=scores[METRIC],
        retention=scores[f"retention/shapes_val/{METRIC}"],
        trainable=trainable_parameters(model),
        checkpoint_mb=os.path.getsize(final) / 2**20,
        minutes=minutes,
        checkpoint=final,
        config=os.path.join(output_dir, "config.yaml"),
    )


def results_table(rows, wise) -> str:
    lines = [
        "| recipe | target AP50 | retention AP50 (shapes_val) | trainable params | "
        "model_final.pth | lr | train time (under load) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['target']:.1f} | {r['retention']:.1f} | "
            f"{r['trainable'] / 1e6:.2f} M | {r['checkpoint_mb']:.1f} MB | {r['lr']:g} | "
            f"{r['minutes']:.1f} min |"
        )
    return "\n".join(lines) + "\n\nWiSE-FT (demo model -> full fine-tune):\n\n" + table(wise)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output)
    logging.basicConfig(
        filename=os.path.join(args.output, "log.txt"),
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    # The demo model's config, and its shapes datasets (shapes_train, shapes_val) registered as
    # the demo job registers them, on the images it drew.
    demo_cfg = LazyConfig.load(os.path.join(args.demo_dir, "config.yaml"))
    shapes = dict(demo_cfg.shapes)
    register_shapes_datasets(root=os.path.join(args.demo_dir, "shapes"), generate=False, **shapes)
    registered = register_shapes_datasets(
        root=os.path.join(args.output, "data"),
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=int(shapes["image_size"]),
        prefix="heldout",
        seed=1,
        **NEW_DATA,
    )
    data = {"train": registered["heldout_train"], "val": registered["heldout_val"]}
    print(f"[data] held-out classes: cyan/pink x hexagon/triangle in {args.output}/data")
    rows = []
    for name in args.recipes:
        rows.append(run_recipe(args, demo_cfg, data, name))
        print(f"[{name}] target {rows[-1]['target']:.1f}  retention {rows[-1]['retention']:.1f}")
    full = next((r for r in rows if r["recipe"] == "full"), None)
    if full is None:
        sys.exit("WiSE-FT needs the full fine-tune: include 'full' in --recipes")
    cfg = get_config(full["config"])
    alphas = [float(a) for a in args.alphas.split(",")]
    wise = run_wise_ft(
        cfg,
        os.path.join(args.demo_dir, "model_final.pth"),
        full["checkpoint"],
        alphas,
        os.path.join(args.output, "wise_ft"),
        metric=METRIC,
        max_target_loss=args.max_target_loss,
    )
    # "full" is the curve's alpha = 1 point; the other recipes are drawn beside the curve.
    points = [
        dict(label=r["recipe"], target=r["target"], retention=r["retention"])
        for r in rows
        if r["recipe"] != "full"
    ]
    draw_curve(dict(wise, extra_points=points), os.path.join(args.output, "tradeoff.png"))
    text = results_table(rows, wise)
    with atomic_file(os.path.join(args.output, "results.md"), replace=False) as f:
        f.write(text + "\n")
    with atomic_file(os.path.join(args.output, "results.json"), replace=False) as f:
        json.dump(dict(recipes=rows, wise_ft=wise, args=vars(args)), f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
