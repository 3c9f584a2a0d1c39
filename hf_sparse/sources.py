"""Where a model name points, checked before anything is loaded (shared by every loader).

A name is a known short name (``smollm2-135m``), a local folder or a Hub id. Local folders are
checked for readable safetensors weights (pickles are never loaded, truncated files are named);
Hub ids are checked against the local Hugging Face cache and the network once per process, so
an offline run fails in milliseconds with one line saying which setting or path would work
(instead of a minute of retries and a traceback).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .real_model import KNOWN_MODELS, fetch_model, resolve_model_path

logger = logging.getLogger(__name__)

WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_reachable: dict[str, bool] = {}  # endpoint -> reachable, probed once per process


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (read now, and as the Hub client read it)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers a TCP connection (probed once per process; False when
    ``HF_HUB_OFFLINE`` is set)."""
    from huggingface_hub import constants

    if hub_offline():
        return False
    endpoint = constants.ENDPOINT
    if endpoint not in _reachable:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            _reachable[endpoint] = True
        except OSError as error:
            logger.info("the Hub at %s is unreachable (%s)", endpoint, error)
            _reachable[endpoint] = False
    return _reachable[endpoint]


def known_name_of_hub_id(hub_id: str) -> str | None:
    """The known short name whose Hub id is ``hub_id`` (``HuggingFaceTB/...`` -> smollm2-135m)."""
    return next((name for name, spec in KNOWN_MODELS.items() if spec.hub_id == hub_id), None)


def _in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an id the cache layout cannot hold (bad characters): not cached
        return False


def resolve_source(name_or_path: str, filename: str = "config.json") -> str:
    """A local folder or a Hub id that ``from_pretrained`` can open now, checked first.

    Known short names become their cached local copy (an error names the fetch command when it
    was never fetched). A known model's Hub id becomes that local copy when the Hub is offline
    or unreachable (logged: it is the copy dequantized from the GGUF file, not the Hub's own
    checkpoint). Any other Hub id must be in the local Hugging Face cache or the Hub reachable.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model must be a name, folder or Hub id, got {name_or_path!r}")
    resolved = resolve_model_path(name_or_path)  # known names, folders, path-like typos
    if Path(resolved).expanduser().is_dir():
        return resolved
    if _in_hub_cache(resolved, filename):
        return resolved
    if hub_reachable():
        return resolved
    known = known_name_of_hub_id(resolved)
    if known is not None:
        spec = KNOWN_MODELS[known]
        path = str(fetch_model(known))  # raises with the fetch command when never fetched
        logger.info(
            "%s: the Hub is not reachable; using the local copy of %s (dequantized from %s) at %s",
            resolved, known, spec.gguf_file, path,
        )  # fmt: skip
        return path
    why = (
        "HF_HUB_OFFLINE is set"
        if hub_offline()
        else "the Hub is unreachable (no network; set HF_HUB_OFFLINE=1 to skip the check)"
    )
    raise FileNotFoundError(
        f"{resolved!r} is not a local folder and not in the Hugging Face cache, and {why}: "
        "pass a local folder, download it once with network (hf download "
        f"{resolved}), or use a known name ({', '.join(sorted(KNOWN_MODELS))})"
    )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a saved model folder (index or ``*.safetensors``); a folder with
    only pickled weights is refused with the conversion to make."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{index} is not a valid safetensors index (no weight_map)") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: {WEIGHTS_INDEX} names missing files {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise ValueError(
            f"{folder} holds no *.safetensors weights (found {pickles}: convert them to "
            "safetensors in a session you trust, e.g. AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(new_dir); pickles are never loaded)"
        )
    raise FileNotFoundError(f"{folder} holds no *.safetensors weights")


def check_safetensors(files: list[Path]) -> None:
    """Every file's header parses and covers the file (a truncated download or copy fails)."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError, OSError: both mean unreadable
            raise ValueError(
                f"safetensors file {file} is truncated or corrupt ({error}); copy or download "
                "it again"
            ) from None


def check_weights_folder(folder: str | os.PathLike) -> list[Path]:
    """The readable safetensors files of a model folder (checked before loading)."""
    folder = Path(folder)
    files = weight_files(folder)
    check_safetensors(files)
    return files
