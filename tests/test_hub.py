"""Model card rendering and the folder that push_to_hub would upload (the Hub is unreachable)."""

from __future__ import annotations

from pathlib import Path

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

    def create_branch(self, repo_id, branch, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, commit_message, revision=None, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = (
                source if isinstance(source, bytes) else Path(source).read_bytes()
            )
        self.calls.append(("create_commit", repo_id, files, commit_message, revision))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})


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
    before = folder_bytes(saved)
    api = RecordingApi()
    info = push_to_hub(saved, "someone/tiny-wanda-2of4", api=api, revision="v1",
                       commit_message="first")  # fmt: skip
    assert info.commit_url.startswith("https://huggingface.co/someone/tiny-wanda-2of4")
    ((_, repo, files, message, revision),) = [c for c in api.calls if c[0] == "create_commit"]
    assert (repo, message, revision) == ("someone/tiny-wanda-2of4", "first", "v1")
    assert ("create_branch", repo, "v1") in api.calls
    assert set(files) == set(before)  # every file, nothing else
    assert b'from_pretrained("someone/tiny-wanda-2of4")' in files["README.md"]
    assert folder_bytes(saved) == before  # the card with the repo id went up from memory


def test_push_refuses_bad_input_before_uploading(saved, tmp_path):
    api = RecordingApi()
    with pytest.raises(ValueError, match="namespace/name"):
        push_to_hub(saved, "no-namespace", api=api)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an output folder"):
        push_to_hub(tmp_path / "empty", "a/b", api=api)
    (saved / "README.md").rename(tmp_path / "card.md")
    with pytest.raises(ValueError, match=r"incomplete model folder \(missing \['README.md'\]"):
        push_to_hub(saved, "a/b", api=api)
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "nope", "a/b", api=api)
    assert api.calls == []


def test_cli_push_calls_the_hub(saved, monkeypatch, capsys):
    import huggingface_hub

    from hf_sparse import push
    from hf_sparse.cli import main

    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    monkeypatch.setattr(push, "_check_hub", lambda token: None)
    argv = ["push", str(saved), "--repo-id", "me/model", "--private", "--commit-message", "m"]
    assert main(argv) == 0
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][2]["private"] is True and api.calls[1][3] == "m"
    assert "pushed" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_push_fails_fast_in_one_line_and_leaves_the_folder_as_it_was(
    saved, monkeypatch, capsys, how
):
    import time

    import huggingface_hub.constants

    from hf_sparse import sources
    from hf_sparse.cli import main

    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:  # a network that answers nothing: the probe is the only attempt
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
        monkeypatch.setattr(sources, "_reachable", {})
    before = folder_bytes(saved)
    start = time.monotonic()
    code = main(["push", str(saved), "--repo-id", "me/model"])
    seconds = time.monotonic() - start
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    (line,) = err.strip().splitlines()
    expected = "HF_HUB_OFFLINE is set" if how == "HF_HUB_OFFLINE" else "unreachable"
    assert line.startswith("hf-sparse push: error: cannot push: ") and expected in line
    assert "--dry-run" in line  # names a way forward
    assert seconds < 5, seconds
    assert folder_bytes(saved) == before


def test_dry_run_prints_files_and_card_without_network(saved, monkeypatch, capsys):
    from hf_sparse import push
    from hf_sparse.cli import main

    def no_network(*args, **kwargs):
        raise AssertionError("the dry run touched the network")

    monkeypatch.setattr(push, "_check_hub", no_network)
    before = folder_bytes(saved)
    assert main(["push", str(saved), "--repo-id", "me/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in before:
        assert name in out
    assert 'from_pretrained("me/dry")' in out and "<your-namespace>" not in out
    assert folder_bytes(saved) == before


def folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.mark.parametrize("kind", ["masked_lr", "basis_sharing", "spd", "lora", "study"])
def test_dry_run_of_each_kind_lists_its_files(kind, tmp_path, capsys):
    from hf_sparse.cli import main
    from hf_sparse.outputs import RESULTS_FILE
    from tests.test_loading import make_adapter

    folder = tmp_path / kind
    if kind == "study":  # what run_study writes, in small (no weights)
        folder.mkdir()
        (folder / RESULTS_FILE).write_text('{"kind": "analysis", "base_model": "m/x"}')
        (folder / "config.json").write_text('{"model": "m/x"}')  # the study's settings
        (folder / "report.html").write_text("<html></html>")
        (folder / "plots").mkdir()
        (folder / "plots" / "a.png").write_bytes(b"png")
        (folder / "README.md").write_text("# study of <your-namespace>/<model-name>\n")
        expected = "study"
    else:
        ws = tmp_path / "ws"
        ws.mkdir()
        make_adapter(_base_folder(ws), kind, folder)
        expected = "adapter"
    before = folder_bytes(folder)
    assert main(["push", str(folder), "--repo-id", "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{expected} folder {folder} -> https://huggingface.co/me/x")
    listed = [line.split()[-1] for line in out.split("\n--- ")[0].splitlines()[1:-1]]
    assert listed == sorted(before)
    assert folder_bytes(folder) == before


def test_an_adapter_folder_without_weights_or_card_is_refused_before_any_network(tmp_path):
    from tests.test_loading import make_adapter

    folder = tmp_path / "lora"
    make_adapter(_base_folder(tmp_path), "lora", folder)
    (folder / "README.md").unlink()
    with pytest.raises(ValueError, match=r"incomplete adapter folder \(missing \['README.md'\]"):
        push_to_hub(folder, "me/x", api=RecordingApi())
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        push_to_hub(folder, "me/x", dry_run=True)


def _base_folder(root):
    from tests.conftest import build_word_tokenizer
    from tests.test_loading import WORDS

    build_tiny_model("llama").save_pretrained(root / "base")
    build_word_tokenizer(WORDS).save_pretrained(root / "base")
    return root
