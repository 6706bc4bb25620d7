"""Test configuration: CPU only, offline (nothing may reach a model hub)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The bf16 tests run on every CPU: on one without native bfloat16 (AVX2 only) the project
# refuses bf16 unless asked, so the suite asks (tests of the refusal remove it).
os.environ.setdefault("GROUNDING_DINO_ALLOW_EMULATED_BF16", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def autograd_left_enabled():
    """Fails a test after which autograd is off: library code that runs in the caller's process
    must use ``torch.no_grad()`` scopes, never ``torch.set_grad_enabled(False)``, or every later
    training test in the process breaks far from the cause."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("autograd was left disabled (torch.set_grad_enabled(False) outside a scope?)")


@pytest.fixture(scope="session")
def minilm_dir():
    """Local folder of the pretrained MiniLM BERT (bert-base-uncased vocabulary)."""
    from grounding_dino.text.tokenizer import local_bert_dir

    return local_bert_dir()


@pytest.fixture(scope="session")
def converted_tiny(tmp_path_factory, minilm_dir):
    """
    A small random transformers Grounding DINO (every parameter perturbed), saved and converted
    with the project's CLI. Returns (hf_model, out_dir with model.pth and config.yaml, stdout).
    """
    from hf_reference import convert_hf_folder, perturbed_hf_model

    folder = tmp_path_factory.mktemp("hf_tiny")
    hf = perturbed_hf_model()
    hf.save_pretrained(folder)
    out_dir = tmp_path_factory.mktemp("converted_tiny")
    stdout = convert_hf_folder(folder, out_dir, minilm_dir)
    return hf, out_dir, stdout


@pytest.fixture(scope="session")
def load_converted():
    """A converted model (config.yaml + model.pth, with ``key=value`` overrides) on the CPU in
    eval mode, through the project's one loader (``model_zoo.get``)."""

    def load(out_dir, overrides=()):
        from grounding_dino import model_zoo

        return model_zoo.get(str(out_dir / "config.yaml"), overrides=overrides, device="cpu")

    return load


@pytest.fixture(scope="session")
def tiny_model():
    """The random-weight model of ``configs/shapes_tiny.py`` on the CPU in eval mode: the one
    small model of the tests that need a Grounding DINO but no particular weights. Tests must
    not change it (it is shared by the session)."""
    from detectron2.config import instantiate

    from grounding_dino.model_zoo import get_config

    torch.manual_seed(0)
    return instantiate(get_config("shapes_tiny.py").model).eval()
