"""Model card rendering and the folder that push_to_hub would upload (the Hub is unreachable)."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.hub import card_metadata, push_to_hub
from hf_sparse.pruning import oneshot
from tests.conftest import build_tiny_model


class RecordingApi:
    """Stands in for huggingface_hub.HfApi and records what would be uploaded."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, **kwargs):
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, files))
        return "https://huggingface.co/" + repo_id


@pytest.fixture
def saved(tmp_path):
    recipe = {
        "model": "tiny",
        "pruning": {"wanda": {"mask": "2:4"}},
        "output_dir": str(tmp_path / "pruned"),
    }
    oneshot(
        build_tiny_model("llama"),
        recipe,
        dataset=torch.randint(0, 128, (4, 16)),
        show_progress=False,
    )
    return tmp_path / "pruned"


def test_card_names_base_model_method_settings_and_sparsity(saved):
    card = (saved / "README.md").read_text()
    meta = card_metadata(card)
    assert "base_model" not in meta  # "tiny" is not a Hub id (tests/test_cards.py: real ids)
    assert {"hf-sparse", "pruned", "wanda", "sparsity-2of4"} <= set(meta["tags"])
    assert "hf_sparse" not in meta["tags"]  # one spelling of the library tag
    assert "50% of the weights" in card and "(2:4; measured: 50.00%" in card
    assert "wanda:" in card  # the recipe is embedded
    assert "Nothing was measured on a dataset" in card


def test_push_uploads_the_saved_folder_with_the_repo_id_in_the_card(saved):
    api = RecordingApi()
    url = push_to_hub(saved, "someone/tiny-wanda-2of4", api=api)
    assert url.endswith("someone/tiny-wanda-2of4")
    ((kind, repo, files),) = [c for c in api.calls if c[0] == "upload_folder"]
    assert repo == "someone/tiny-wanda-2of4"
    assert {
        "config.json",
        "model.safetensors",
        "sparsity_masks.safetensors",
        "README.md",
        "recipe.yaml",
    } <= set(files)
    assert b'from_pretrained("someone/tiny-wanda-2of4")' in files["README.md"]


def test_push_refuses_bad_input_before_uploading(saved, tmp_path):
    api = RecordingApi()
    with pytest.raises(ValueError, match="namespace/name"):
        push_to_hub(saved, "no-namespace", api=api)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing"):
        push_to_hub(tmp_path / "empty", "a/b", api=api)
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "nope", "a/b", api=api)
    assert api.calls == []


def test_cli_push_calls_the_hub(saved, monkeypatch, capsys):
    import huggingface_hub

    from hf_sparse.cli import main

    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    assert main(["push", str(saved), "--repo-id", "me/model"]) == 0
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
