"""Calibration and evaluation text: named sets, local files, Hub datasets; token windows.

Resolution, so the same code serves users everywhere: an explicit path wins; a named set
(``wikitext2``, ``ptb``, ``c4``, ``lambada``, ``alpaca``, ``tinystories``) resolves to a local
copy when ``HF_SPARSE_DATA_DIR`` is set or ``../shared/data`` exists beside the checkout (or
the working directory), and otherwise to its Hub dataset through ``datasets.load_dataset``.

Local copies of ``ptb`` and ``c4`` (not shipped in ``shared/data``; put them there yourself):

- ``ptb/ptb.train.txt`` (calibration) and ``ptb/ptb.test.txt`` (evaluation): the Penn Treebank
  language-modelling text of Mikolov et al. as distributed, one sentence per line.
- ``c4/c4-train.00000-of-01024.json`` (calibration) and ``c4/c4-validation.00000-of-00008.json``
  (evaluation): the first shards of the ``en`` variant of allenai/c4, decompressed, one JSON
  record per line with a ``text`` field (the shards SparseGPT and Wanda calibrate on).
"""

from __future__ import annotations

import difflib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class NamedDataset:
    """A dataset known by name: its local files (relative to the data dir) and Hub fallback."""

    calibration_file: str
    evaluation_file: str
    hub: tuple[str, str | None]  # (path, config name) for datasets.load_dataset
    hub_splits: tuple[str, str]  # (calibration split, evaluation split)
    text_field: str = "text"
    # Files inside the Hub repo, one per split, for sets too large to load whole (C4); None loads
    # the named config's splits.
    hub_data_files: tuple[str, str] | None = None
    separator: str = "\n\n"  # between records of the Hub copy (PTB's local file: one per line)

    def hub_source(self, split: str) -> tuple[str, str | None, str, str, dict | None]:
        """``(path, config, split, text field, data_files)`` of the Hub copy of ``split``."""
        index = int(split != "calibration")
        hub_split = self.hub_splits[index]
        files = None if self.hub_data_files is None else {hub_split: self.hub_data_files[index]}
        return self.hub[0], self.hub[1], hub_split, self.text_field, files


NAMED_DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset(
        "wikitext-2/wiki.valid.tokens",
        "wikitext-2-raw/wiki.test.raw",
        ("Salesforce/wikitext", "wikitext-2-raw-v1"),
        ("validation", "test"),
    ),
    "ptb": NamedDataset(
        "ptb/ptb.train.txt",
        "ptb/ptb.test.txt",
        ("ptb-text-only/ptb_text_only", "penn_treebank"),
        ("train", "test"),
        text_field="sentence",
        separator="\n",
    ),
    "c4": NamedDataset(
        "c4/c4-train.00000-of-01024.json",
        "c4/c4-validation.00000-of-00008.json",
        ("allenai/c4", None),
        ("train", "validation"),
        hub_data_files=(
            "en/c4-train.00000-of-01024.json.gz",
            "en/c4-validation.00000-of-00008.json.gz",
        ),
    ),
    "lambada": NamedDataset(
        "lambada/lambada_test.jsonl",
        "lambada/lambada_test.jsonl",
        ("EleutherAI/lambada_openai", "default"),
        ("test", "test"),
    ),
    "alpaca": NamedDataset(
        "alpaca/alpaca_data.sample5000.jsonl",
        "alpaca/alpaca_data.sample5000.jsonl",
        ("tatsu-lab/alpaca", None),
        ("train", "train"),
    ),
    "tinystories": NamedDataset(
        "tinystories/TinyStories-train.first2MiB.txt",
        "tinystories/TinyStories-train.first2MiB.txt",
        ("roneneldan/TinyStories", None),
        ("train", "validation"),
    ),
}
_TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".text", ".md"}


def data_dir() -> Path | None:
    """Local folder of named datasets, or None when there is none."""
    if os.environ.get("HF_SPARSE_DATA_DIR"):
        return Path(os.environ["HF_SPARSE_DATA_DIR"]).expanduser()
    candidates = [
        Path(__file__).resolve().parents[2] / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]
    return next((c for c in candidates if c.is_dir()), None)


def _records_to_text(
    records: list[dict], text_field: str, source: str, separator: str = "\n\n"
) -> str:
    if not records:
        raise ValueError(f"{source} holds no records")
    if text_field in records[0]:
        return separator.join(str(r[text_field]) for r in records)
    if {"instruction", "output"} <= set(records[0]):  # Alpaca-style records
        return "\n\n".join(
            "\n".join(str(r[k]) for k in ("instruction", "input", "output") if r.get(k))
            for r in records
        )
    raise ValueError(
        f"{source} has no {text_field!r} field (fields: {sorted(records[0])}); "
        "pass text_field=<the column holding the text>"
    )


def read_text_file(path: str | os.PathLike, text_field: str = "text") -> str:
    """Whole text of a local ``.txt``/``.raw``/``.tokens`` file, or a jsonl/json/parquet column."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        return path.read_text(encoding="utf-8")
    if suffix in {".jsonl", ".json", ".parquet"}:
        import datasets

        builder = "parquet" if suffix == ".parquet" else "json"
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # empty or malformed files surface as datasets internals
            raise ValueError(f"could not read records from {path}: {error!r}") from error
        return _records_to_text(table.to_list(), text_field, str(path))
    raise ValueError(
        f"unsupported data file type {suffix!r} for {path}; use .txt/.raw/.tokens text, "
        ".jsonl/.json or .parquet"
    )


def load_text(
    source: str | os.PathLike, split: str = "calibration", text_field: str = "text"
) -> str:
    """Text of a named dataset (``split`` = "calibration" or "evaluation"), a file or a Hub set."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        return read_text_file(path, text_field)
    named = NAMED_DATASETS.get(source)
    if named is not None:
        local = data_dir()
        filename = named.calibration_file if split == "calibration" else named.evaluation_file
        if local is not None and (local / filename).exists():
            return read_text_file(local / filename, named.text_field)
        return _load_hub_text(*named.hub_source(split), named.separator)
    _check_hub_dataset_id(source)
    return _load_hub_text(source, None, "train" if split == "calibration" else "test", text_field)


def check_data_source(source: str | os.PathLike) -> None:
    """Refuse, before any work and without the network, a data source that cannot resolve: a
    missing file, or a name that is neither a named dataset nor a Hub id (``owner/name``)."""
    text = str(source)
    if Path(text).expanduser().exists() or text in NAMED_DATASETS:
        return
    _check_hub_dataset_id(text)


def _check_hub_dataset_id(source: str) -> None:
    """Refuse, without touching the network, a source that is neither an existing file, a named
    set nor a Hub id of the ``owner/name`` form (a typo would otherwise cost a minute of Hub
    retries)."""
    path_like = source.startswith((".", "/", "~")) or Path(source).suffix.lower() in (
        _TEXT_SUFFIXES | {".jsonl", ".json", ".parquet"}
    )
    if path_like:
        raise FileNotFoundError(
            f"data file {source} does not exist; pass an existing .txt/.raw/.tokens, "
            f".jsonl/.json or .parquet file, or a named dataset: {', '.join(NAMED_DATASETS)}"
        )
    parts = source.split("/")
    if len(parts) != 2 or not all(parts):
        close = difflib.get_close_matches(source, list(NAMED_DATASETS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown dataset {source!r}{hint}: not a file, not a named dataset "
            f"({', '.join(NAMED_DATASETS)}) and not a Hub id of the form owner/name; pass a "
            "local file path (e.g. ./data/train.txt or ./data/train.jsonl), a named dataset, "
            "or a Hub dataset id"
        )


def _load_hub_text(
    path: str,
    name: str | None,
    split: str,
    text_field: str,
    data_files: dict | None = None,
    separator: str = "\n\n",
) -> str:
    import datasets

    extra = {"data_files": data_files} if data_files is not None else {}
    try:
        table = datasets.load_dataset(path, name, split=split, **extra)
    except Exception as error:  # network or name problems: say what was tried
        files = f", files {sorted(data_files.values())}" if data_files else ""
        raise ValueError(
            f"could not load Hub dataset {path!r} (config {name!r}, split {split!r}{files}): "
            f"{error}. Offline? Pass a local file, set HF_SPARSE_DATA_DIR, or use one of "
            f"{sorted(NAMED_DATASETS)} with a local data folder."
        ) from error
    return _records_to_text(table.to_list(), text_field, f"{path}:{split}", separator)


def _read_records_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in {".jsonl", ".json", ".parquet"}:
        raise ValueError(f"records must be .jsonl, .json or .parquet, got {path}")
    import datasets

    builder = "parquet" if suffix == ".parquet" else "json"
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # empty or malformed files surface as datasets internals
        raise ValueError(f"could not read records from {path}: {error!r}") from error
    return table.to_list()


def load_records(source: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Records (dicts) of a jsonl/json/parquet file, a named dataset (``alpaca``) or a Hub set.

    Used for instruction data, where each example keeps its fields (instruction, input,
    output) instead of being joined into one text.
    """
    source = str(source)
    path = Path(source).expanduser()
    named = NAMED_DATASETS.get(source)
    if path.exists():
        records = _read_records_file(path)
    elif (
        named is not None
        and (local := data_dir()) is not None
        and (local / named.calibration_file).exists()
    ):
        records = _read_records_file(local / named.calibration_file)
    else:
        if named is None:
            _check_hub_dataset_id(source)
        import datasets

        hub, config = named.hub if named is not None else (source, None)
        extra = {}
        if named is not None and named.hub_data_files is not None:
            extra = {"data_files": {"train": named.hub_data_files[0]}}
        try:
            records = datasets.load_dataset(hub, config, split="train", **extra).to_list()
        except Exception as error:
            raise ValueError(
                f"could not load records of {source!r} from the Hub: {error}. Offline? Pass a "
                "local .jsonl file or set HF_SPARSE_DATA_DIR."
            ) from error
    if not records:
        raise ValueError(f"{source} holds no records")
    return records[:limit] if limit is not None else records


def draw_records(source: str | os.PathLike, count: int, seed: int = 0) -> list[dict]:
    """``count`` records of ``source`` in a seeded random order (an error if there are fewer)."""
    records = load_records(source)
    if len(records) < count:
        raise ValueError(f"{source} has {len(records)} records; {count} are needed")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[:count]]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (no special tokens added)."""
    if not text.strip():
        raise ValueError("text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(token_ids: torch.Tensor, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[count, length]`` windows at random starts drawn with a fixed seed (SparseGPT's way)."""
    _check_window_args(count, length)
    total = token_ids.numel()
    if total <= length:
        raise ValueError(
            f"calibration text has {total} tokens, shorter than one window of {length}+1; "
            "use more text or a smaller sequence_length"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - length, (count,), generator=generator)
    return torch.stack([token_ids[s : s + length] for s in starts.tolist()])


def contiguous_windows(
    token_ids: torch.Tensor, length: int, count: int | None = None
) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``length`` tokens (all when None)."""
    _check_window_args(count if count is not None else 1, length)
    available = token_ids.numel() // length
    if available == 0:
        raise ValueError(f"text has {token_ids.numel()} tokens, fewer than one window of {length}")
    if count is not None and count > available:
        raise ValueError(f"asked for {count} windows of {length} tokens, text holds {available}")
    count = available if count is None else count
    return token_ids[: count * length].reshape(count, length)


def _check_window_args(count: int, length: int) -> None:
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"number of windows must be a positive integer, got {count!r}")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"sequence length must be an integer >= 2, got {length!r}")


def calibration_windows(
    tokenizer,
    source: str = "wikitext2",
    count: int = 64,
    length: int = 512,
    seed: int = 0,
    text_field: str = "text",
) -> torch.Tensor:
    """Protocol v1 calibration set: ``count`` random windows of ``length`` tokens."""
    text = load_text(source, "calibration", text_field)
    return random_windows(tokenize(tokenizer, text), count, length, seed)


def evaluation_windows(
    tokenizer,
    source: str = "wikitext2",
    length: int = 512,
    count: int | None = 32,
    text_field: str = "text",
) -> torch.Tensor:
    """Protocol v1 evaluation set: the first ``count`` non-overlapping windows of the text."""
    text = load_text(source, "evaluation", text_field)
    return contiguous_windows(tokenize(tokenizer, text), length, count)


def shard_for_rank(windows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The contiguous slice of windows rank ``rank`` of ``world_size`` calibrates on."""
    if windows.shape[0] < world_size:
        raise ValueError(f"{windows.shape[0]} windows cannot be shared by {world_size} ranks")
    return windows.tensor_split(world_size)[rank]


# Checks of user-supplied token windows and lengths, shared by every entry point (before work).

_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def max_positions(model_or_config) -> tuple[int, str] | None:
    """``(limit, config field)`` of the longest input the model's positions cover, or None
    when the architecture has no such limit (ALiBi models such as BLOOM)."""
    config = getattr(model_or_config, "config", model_or_config)
    for field in _POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, field
    return None


def check_sequence_length(model_or_config, length: int, where: str = "sequence_length") -> None:
    """Refuse a window longer than the model's maximum positions, naming the limit. Learned
    position tables fail inside torch beyond it; rotary models run but were never trained
    there."""
    found = max_positions(model_or_config)
    if found is not None and length > found[0]:
        limit, field = found
        raise ValueError(
            f"{where} {length} exceeds the model's maximum positions {limit} "
            f"(config.{field}); use a length <= {limit}"
        )


def check_lengths(model_or_config, lengths: dict[str, int | None]) -> None:
    """``check_sequence_length`` for every ``{recipe field: length}`` (None entries skipped)."""
    for where, length in lengths.items():
        if length is not None:
            check_sequence_length(model_or_config, length, where)


def check_batch_size(value: object, where: str = "batch_size") -> int:
    """A positive integer, or a ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def vocabulary_size(model) -> int | None:
    """Rows of the input embedding (what token ids index), else ``config.vocab_size``."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_token_windows(windows: object, model=None, where: str = "calibration") -> torch.Tensor:
    """Refuse token windows a model cannot run on, naming ``where`` and the fix: not a tensor,
    not integer ids, not ``[n, seq_len]``, empty, ids outside the vocabulary, or (with
    ``model``) longer than its maximum positions."""
    fix = "build them with hf_sparse.data.calibration_windows(tokenizer, ...)"
    if not isinstance(windows, torch.Tensor):
        raise TypeError(
            f"{where} must be a [n, seq_len] tensor of token ids, got {type(windows).__name__}; "
            f"{fix}"
        )
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise TypeError(
            f"{where} holds {windows.dtype} values; token ids must be integers (torch.long): "
            f"convert with .long() only if they are ids, else {fix}"
        )
    if windows.ndim != 2:
        raise ValueError(
            f"{where} must be a [n, seq_len] tensor of token ids, got shape "
            f"{tuple(windows.shape)}; stack the windows (a single one: windows[None])"
        )
    if windows.numel() == 0:
        raise ValueError(f"{where} is empty (shape {tuple(windows.shape)}); {fix}")
    low, high = int(windows.min()), int(windows.max())
    vocab = vocabulary_size(model) if model is not None else None
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        limit = f"0..{vocab - 1}" if vocab is not None else ">= 0"
        raise ValueError(
            f"{where} holds token id {bad}, outside the model's vocabulary (ids {limit}); were "
            "the windows made with another model's tokenizer?"
        )
    if model is not None:
        check_sequence_length(model, windows.shape[1], f"{where} sequence length")
    return windows
