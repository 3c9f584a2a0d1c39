"""Execution device and bounded memory: blocks onloaded one at a time, accelerate-offloaded
models (disk and CPU offload) prune like fully loaded ones, block inputs kept on the CPU."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
import torch
from conftest import VOCAB, build_tiny_model, make_token_windows
from transformers import AutoModelForCausalLM

from hf_sparse import execution
from hf_sparse.calibration import run_sequential
from hf_sparse.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_

WINDOWS = make_token_windows(VOCAB, 4, 16, seed=5)
CONFIGS = {
    "sparsegpt": lambda **kw: SparseGPTConfig(sparsity=0.5, **kw),
    "wanda": lambda **kw: WandaConfig(sparsity=0.5, mask="2:4", **kw),
    "magnitude": lambda **kw: MagnitudeConfig(sparsity=0.5, **kw),
    "wanda-owl": lambda **kw: WandaConfig(sparsity=0.5, sparsity_profile="owl", **kw),
}
# layer 0 on disk (files in offload_folder), layer 1 offloaded to CPU RAM, the rest loaded
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: statistics on one thread


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoint"
    build_tiny_model("llama", seed=0).save_pretrained(folder)
    return folder


def folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=WINDOWS).logits


@pytest.mark.parametrize("method", list(CONFIGS))
def test_disk_offloaded_model_prunes_like_the_loaded_one(checkpoint, tmp_path, method):
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    expected = prune_(loaded, CONFIGS[method](), WINDOWS, batch_size=2, show_progress=False)
    before = folder_digest(checkpoint)
    offloaded = AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload")
    ).eval()
    q_proj = offloaded.model.layers[0].self_attn.q_proj
    assert q_proj.weight.device.type == "meta"  # really offloaded
    result = prune_(offloaded, CONFIGS[method](), WINDOWS, batch_size=2, show_progress=False)
    assert result.masks.keys() == expected.masks.keys()
    for name, keep in expected.masks.items():
        assert torch.equal(result.masks[name], keep), name
    assert result.measured_sparsity == pytest.approx(expected.measured_sparsity)
    assert q_proj.weight.device.type == "meta"  # put back where it was, not left loaded
    torch.testing.assert_close(logits(offloaded), logits(loaded), rtol=0, atol=1e-6)
    assert folder_digest(checkpoint) == before  # the checkpoint read lazily is not written
    offloaded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(logits(reloaded), logits(loaded), rtol=0, atol=1e-6)


def test_inputs_offloaded_to_cpu_give_the_same_masks(monkeypatch):
    config = CONFIGS["sparsegpt"]
    on_device = prune_(build_tiny_model("llama"), config(), WINDOWS, batch_size=2,
                       show_progress=False)  # fmt: skip
    moved: list[torch.device] = []
    original = execution.to_device

    def spy(value, device):
        moved.append(torch.device(device))
        return original(value, device)

    monkeypatch.setattr("hf_sparse.calibration.to_device", spy)
    offloaded = prune_(build_tiny_model("llama"), config(offload_inputs=True), WINDOWS,
                       batch_size=2, show_progress=False)  # fmt: skip
    assert moved and all(d.type == "cpu" for d in moved)
    for name, keep in on_device.masks.items():
        assert torch.equal(offloaded.masks[name], keep), name


def test_each_block_is_onloaded_in_turn_and_put_back(monkeypatch):
    """With an execution device other than the model's, each block is moved there for its
    stage and moved back after (checked with a recording stand-in for the move)."""
    model = build_tiny_model("llama")
    events: list[tuple[str, str]] = []
    original = execution.onloaded

    @contextlib.contextmanager
    def recording(block, device):
        index = str(list(model.model.layers).index(block))
        events.append(("on", index))
        with original(block, device):
            yield block
        events.append(("off", index))

    monkeypatch.setattr("hf_sparse.calibration.onloaded", recording)
    run_sequential(model, WINDOWS, lambda name, block: None, batch_size=2, show_progress=False,
                   device="cpu")  # fmt: skip
    assert events == [("on", "0"), ("off", "0"), ("on", "1"), ("off", "1")]


def test_changes_made_inside_onloaded_persist_in_the_same_parameters():
    """What a method writes while the block is onloaded stays, in the very Parameter objects
    (optimisers and hooks hold them); untouched weights keep their values."""
    model = build_tiny_model("llama")
    block = model.model.layers[0]
    params = {name: p for name, p in block.named_parameters()}
    values = {name: p.detach().clone() for name, p in params.items()}
    with execution.onloaded(block, torch.device("cpu")):
        block.mlp.down_proj.weight.data.mul_(0)
    for name, p in block.named_parameters():
        assert p is params[name]
    assert torch.count_nonzero(block.mlp.down_proj.weight) == 0
    assert torch.equal(block.self_attn.q_proj.weight, values["self_attn.q_proj.weight"])


def test_default_device_is_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert execution.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert execution.resolve_device(None) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert execution.resolve_device("cuda") == torch.device("cuda", 1)  # as tensors report it
    assert execution.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        execution.resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "CUDA is not available"), ("meta", "holds no data"), ("gpu0", "not a torch device")],
)
def test_bad_device_fails_before_work(device, message):
    model = build_tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        prune_(model, SparseGPTConfig(sparsity=0.5, device=device), WINDOWS, show_progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
