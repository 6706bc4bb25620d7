"""The component registries for real: a user module registers a feature enhancer and a config
override selects it, on ``train_net.py``'s command line and through the yacs bridge."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.config import get_cfg, instantiate
from detectron2.modeling import build_model

from grounding_dino.config import add_grounding_dino_config
from grounding_dino.model_zoo import get_config, get_config_file
from grounding_dino.modeling import FEATURE_ENHANCER_REGISTRY, build_enhancer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "gdino_toy_enhancer"

# A one-layer fusion: image tokens attend to the text, text tokens to the image. It takes the
# keyword arguments of the config's FeatureEnhancer node (and ignores the deformable ones).
# Every forward appends a line to $TOY_ENHANCER_MARKER.
TOY_MODULE = """
import os

from torch import nn

from grounding_dino.modeling import FEATURE_ENHANCER_REGISTRY


@FEATURE_ENHANCER_REGISTRY.register()
class ToyEnhancer(nn.Module):
    def __init__(self, *, d_model, fusion_heads, **unused):
        super().__init__()
        self.toy_image_from_text = nn.MultiheadAttention(d_model, fusion_heads, batch_first=True)
        self.toy_text_from_image = nn.MultiheadAttention(d_model, fusion_heads, batch_first=True)

    def forward(self, image, text):
        marker = os.environ.get("TOY_ENHANCER_MARKER")
        if marker:
            with open(marker, "a") as f:
                f.write(f"{tuple(image.tokens.shape)} {tuple(text.features.shape)}\\n")
        tokens, features = image.tokens, text.features
        fused_image, _ = self.toy_image_from_text(
            tokens, features, features, key_padding_mask=~text.token_mask
        )
        fused_text, _ = self.toy_text_from_image(
            features, tokens, tokens, key_padding_mask=~image.valid_mask
        )
        return image.with_tokens(tokens + fused_image), text.with_features(features + fused_text)
"""


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TOY_ENHANCER_MARKER", str(tmp_path / "marker.txt"))
    monkeypatch.setenv("GROUNDING_DINO_SHAPES_DIR", str(tmp_path / "shapes"))
    yield tmp_path
    sys.modules.pop(MODULE, None)
    if "ToyEnhancer" in FEATURE_ENHANCER_REGISTRY:
        FEATURE_ENHANCER_REGISTRY._obj_map.pop("ToyEnhancer")  # leave the registry as found


def _enhancer_parameter_names(state_dict):
    return sorted(k[len("enhancer.") :] for k in state_dict if k.startswith("enhancer."))


@pytest.mark.slow
def test_train_net_trains_one_step_with_a_registered_enhancer(toy_module):
    output_dir = toy_module / "output"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(toy_module), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train_net.py"),
            "--config-file",
            get_config_file("shapes_tiny.py"),
            f"model.enhancer.name={MODULE}.ToyEnhancer",
            "train.max_iter=1",
            "train.eval_period=-1",  # no evaluation: the test is about training
            f"train.output_dir={output_dir}",
            "dataloader.train.total_batch_size=2",
        ],
        cwd=str(toy_module),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # The toy ran (one training forward of 2 images) ...
    lines = (toy_module / "marker.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("(2, ")
    # ... and is the model's enhancer: the checkpoint has its parameters and no other.
    state = torch.load(output_dir / "model_final.pth", weights_only=True)["model"]
    names = _enhancer_parameter_names(state)
    assert names and all(n.startswith("toy_") for n in names), names
    assert state["enhancer.toy_image_from_text.in_proj_weight"].shape == (3 * 128, 128)
    assert any(k.startswith("decoder.") for k in state)  # the rest of the model is there


def test_yacs_overrides_select_a_registered_enhancer(toy_module):
    cfg = get_cfg()
    add_grounding_dino_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "grounding_dino_swin_t_ogc.yaml"))
    cfg.MODEL.GROUNDING_DINO.CONFIG_FILE = get_config_file("shapes_tiny.py")
    cfg.MODEL.GROUNDING_DINO.OVERRIDES = [f"model.enhancer.name={MODULE}.ToyEnhancer"]
    cfg.MODEL.GROUNDING_DINO.PROMPT = "red square . blue circle ."
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    assert type(model.enhancer).__name__ == "ToyEnhancer"
    assert type(model.enhancer).__module__ == MODULE
    names = _enhancer_parameter_names(model.state_dict())
    assert names and all(n.startswith("toy_") for n in names)
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    out = model([{"image": image}])[0]  # default prompt and test resize of the bridge
    assert out["instances"].image_size == (64, 80)
    assert len((toy_module / "marker.txt").read_text().splitlines()) == 1


def test_unknown_component_names_are_clear_errors(toy_module):
    cfg = get_config("shapes_tiny.py")
    cfg.model.enhancer.name = "NoSuchEnhancer"
    with pytest.raises(ValueError, match="NoSuchEnhancer.*registered: .*FeatureEnhancer"):
        instantiate(cfg.model.enhancer)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        build_enhancer(name="no_such_module.ToyEnhancer")
    with pytest.raises(ValueError, match="no component named 'Missing'"):
        build_enhancer(name=f"{MODULE}.Missing")
