"""
Weights loaded for a model map the checkpoint file instead of reading it whole
(``load_checkpoint_file(map_file=True)``, used by ``model_zoo.build_model``): the same
tensors, the mapping gone once the model is loaded, and torch's legacy format still read whole.
"""

import gc

import pytest
import torch
from detectron2.config import instantiate

from grounding_dino import model_zoo
from grounding_dino.convert.checkpoint import load_checkpoint_file


def _mapped(path) -> bool:
    """Whether this process maps ``path`` (Linux's /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


@pytest.fixture(scope="module")
def tiny_config():
    return model_zoo.get_config("shapes_tiny.py")


@pytest.mark.parametrize("zip_format", [True, False])
def test_build_model_maps_the_checkpoint_and_loads_equal_weights(tmp_path, tiny_config, zip_format):
    torch.manual_seed(1)
    state = instantiate(tiny_config.model).state_dict()
    path = tmp_path / "model.pth"
    torch.save({"model": state}, path, _use_new_zipfile_serialization=zip_format)

    data = load_checkpoint_file(str(path), map_file=True)
    assert _mapped(path) == zip_format  # the legacy format cannot be mapped: read whole
    assert all(torch.equal(data["model"][key], value) for key, value in state.items())
    del data
    gc.collect()
    assert not _mapped(path)

    model = model_zoo.build_model(tiny_config, weights=str(path), device="cpu")
    gc.collect()
    assert not _mapped(path)  # nothing of the loaded file outlives the load
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_read_whole_by_default(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.arange(6.0)}, path)
    data = load_checkpoint_file(str(path))
    assert not _mapped(path)
    assert torch.equal(data["w"], torch.arange(6.0))
