"""Pushing a saved folder to the Hub (cards are rendered by ``hf_sparse.cards``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .cards import (  # noqa: F401 - re-exported: the card renderers used to live here
    card_metadata,
    load_template,
    render_adapter_card,
    render_merge_card,
    render_model_card,
)

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "README.md")


def check_upload_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder to push {folder} does not exist")
    missing = [f for f in REQUIRED_FILES if not (folder / f).exists()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise ValueError(
            f"{folder} is not a saved hf_sparse model (missing {missing}); save it with "
            "`hf-sparse prune`/`hf-sparse run` or `oneshot(..., output_dir=...)` first"
        )
    return folder


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload pruned model (hf_sparse)",
    api=None,
):
    """Upload a saved folder (weights, config, masks, card) to ``repo_id``.

    The card's usage snippet is re-rendered with the real ``repo_id`` before upload.
    ``api`` defaults to ``huggingface_hub.HfApi(token=token)``.
    """
    folder = check_upload_folder(folder)
    if not repo_id or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'namespace/name', got {repo_id!r}")
    card = folder / "README.md"
    card.write_text(card.read_text().replace("<your-namespace>/<model-name>", repo_id))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("uploading %s to %s", folder, repo_id)
    return api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message
    )
