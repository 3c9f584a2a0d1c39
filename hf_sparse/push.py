"""Pushing any output folder to the Hub, without ever modifying it.

Lifecycle of ``push_to_hub(folder, repo_id, ...)``:
  1. ``plan_upload``: the folder's kind (the loader's registry: model, adapter, study, ...)
     and that kind's files are checked (weights readable, card present), the card is rendered
     in memory with the real repo id; nothing touches the network. ``dry_run=True`` stops here
     and returns the plan (``hf-sparse push --dry-run`` prints its files and card);
  2. the Hub is checked once (``HF_HUB_OFFLINE``, a 3 s connection probe, a token), so an
     offline push fails in seconds with one line saying what to change;
  3. one commit uploads every file from the folder as is, except ``README.md``, uploaded from
     the rendered bytes. Hub errors (auth, permission, missing branch, network) become one
     ``PushError`` line naming the cause and the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cards import with_repo_id
from .loading import ADAPTER_CONFIG, OUTPUT_KINDS
from .sources import check_safetensors, hub_offline, hub_reachable, weight_files

logger = logging.getLogger(__name__)

CARD = "README.md"
DEFAULT_MESSAGE = "Upload {kind} (hf_sparse)"


class PushError(OSError):
    """The Hub refused or could not be reached; the message names the cause and the fix."""


def _model_files(folder: Path) -> list[str]:
    check_safetensors(weight_files(folder))
    return ["config.json", CARD]


def _adapter_files(folder: Path) -> list[str]:
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors([weights])
    return [ADAPTER_CONFIG, "adapter_model.safetensors", CARD]


def _study_files(folder: Path) -> list[str]:
    return ["hf_sparse_results.json", CARD]


def _nested_files(folder: Path) -> list[str]:
    """The inner adapter's or model's files (in its subfolder) and the card at the top."""
    from .loading import inner_output

    inner = inner_output(folder)
    check = _adapter_files if (inner / ADAPTER_CONFIG).is_file() else _model_files
    return [f"{inner.name}/{name}" for name in check(inner) if name != CARD] + [CARD]


UPLOAD_CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "model": _model_files,
    "adapter": _adapter_files,
    "study": _study_files,
    "nested": _nested_files,
}
"""Per kind: check the folder (raising on unreadable weights) and name the files it needs.
Kinds registered with the loader but not here (a compressed model) get ``_model_files``."""


@dataclass
class UploadPlan:
    folder: Path
    repo_id: str
    kind: str
    files: list[tuple[str, int]]  # (path in repo, bytes), sorted
    card: str  # README.md as it is uploaded (the repo id filled in)

    def describe(self) -> str:
        total = sum(size for _, size in self.files)
        lines = [f"{self.kind} folder {self.folder} -> https://huggingface.co/{self.repo_id}"]
        lines += [f"  {size:>14,d}  {name}" for name, size in self.files]
        lines.append(f"  {total:>14,d}  bytes in {len(self.files)} files")
        return "\n".join(lines)


def detect_kind(folder: Path) -> str:
    for kind in OUTPUT_KINDS.values():
        if kind.detect(folder):
            return kind.name
    raise ValueError(
        f"{folder} is not an output folder (no config.json, {ADAPTER_CONFIG} or analysis "
        "results); save it with an hf-sparse command, a callback or save_pretrained first"
    )


def check_upload_folder(folder: str | os.PathLike) -> Path:
    """Refuse a folder that is not a complete output of a known kind (before any network)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder to push {folder} does not exist")
    kind = detect_kind(folder)
    needed = UPLOAD_CHECKS.get(kind, _model_files)(folder)
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        card = (
            " (a model card: hf_sparse commands and callbacks write one)" if CARD in missing else ""
        )
        raise ValueError(
            f"{folder} is an incomplete {kind} folder (missing {missing}){card}; save it again "
            "with the command or callback that made it, or add the missing files"
        )
    return folder


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(parts) or any(" " in p for p in parts):
        raise ValueError(f"repo_id must look like 'namespace/name', got {repo_id!r}")


def _upload_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` except hidden ones (``.cache``, ``.git``, temp markers)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def render_card_for(folder: Path, repo_id: str) -> str:
    return with_repo_id((folder / CARD).read_text(), repo_id)


def plan_upload(folder: str | os.PathLike, repo_id: str) -> UploadPlan:
    """What a push would upload (no network, nothing written)."""
    _check_repo_id(repo_id)
    folder = check_upload_folder(folder)
    card = render_card_for(folder, repo_id)
    files = []
    for path in _upload_files(folder):
        name = path.relative_to(folder).as_posix()
        size = len(card.encode()) if name == CARD else path.stat().st_size
        files.append((name, size))
    return UploadPlan(folder, repo_id, detect_kind(folder), files, card)


def _check_hub(token: str | None) -> None:
    if hub_offline():
        raise PushError(
            "cannot push: HF_HUB_OFFLINE is set (the Hub client is offline); unset it on a "
            "machine with network, or use --dry-run to see what would be uploaded"
        )
    if not hub_reachable():
        from huggingface_hub import constants

        raise PushError(
            f"cannot push: the Hub at {constants.ENDPOINT} is unreachable (no network?); retry "
            "with network, or use --dry-run to see what would be uploaded"
        )
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise PushError(
            "cannot push: not logged in to the Hub; run `hf auth login`, set HF_TOKEN, or pass "
            "--token"
        )


def _hub_error(error: Exception, repo_id: str, revision: str | None) -> PushError:
    """One line naming the cause and the fix of a Hub failure."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    name = type(error).__name__
    if status == 401 or name in ("GatedRepoError",):
        return PushError(
            f"the Hub refused the token for {repo_id} (401); run `hf auth login` with a write "
            "token or pass --token"
        )
    if status == 403:
        return PushError(
            f"the token may not write to {repo_id} (403); use a namespace you own or a token "
            "with write access"
        )
    if name == "RevisionNotFoundError" or (status == 404 and revision):
        return PushError(f"branch {revision!r} of {repo_id} was not found; create it first")
    if status is not None:
        return PushError(f"the Hub answered {status} for {repo_id}: {_first(error)}")
    return PushError(
        f"cannot reach the Hub to push {repo_id} ({name}: {_first(error)}); check the "
        "network and retry"
    )


def _first(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    dry_run: bool = False,
    api=None,
):
    """Upload an output folder of any kind to ``repo_id`` in one commit; the folder is never
    modified (the card with the repo id is uploaded from memory).

    ``dry_run``: return the :class:`UploadPlan` without touching the network. ``api``
    defaults to ``huggingface_hub.HfApi(token=token)`` (the Hub is probed first, then).
    Returns the commit info (its ``commit_url``).
    """
    plan = plan_upload(folder, repo_id)
    if dry_run:
        return plan
    if api is None:
        _check_hub(token)
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    from huggingface_hub import CommitOperationAdd

    operations = [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=plan.card.encode() if name == CARD else str(plan.folder / name),
        )
        for name, _ in plan.files
    ]
    message = commit_message or DEFAULT_MESSAGE.format(kind=plan.kind)
    logger.info("uploading %d files of %s to %s", len(operations), plan.folder, repo_id)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=message,
            revision=revision,
            repo_type="model",
        )
    except (OSError, ValueError) as error:  # HfHubHTTPError, httpx errors, RevisionNotFound
        raise _hub_error(error, repo_id, revision) from None
    except Exception as error:  # other transport errors of the Hub client
        if type(error).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):
            raise _hub_error(error, repo_id, revision) from None
        raise
