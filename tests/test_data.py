"""Calibration/evaluation text and token windows (hf_sparse.data), offline only."""

from __future__ import annotations

import json

import pytest
import torch

from hf_sparse import data
from hf_sparse.data import (
    calibration_windows,
    contiguous_windows,
    data_dir,
    evaluation_windows,
    load_text,
    random_windows,
    read_text_file,
    shard_for_rank,
    tokenize,
)

TEXT = (
    "the quick brown fox jumps over the lazy dog . "
    "a stitch in time saves nine . every cloud has a silver lining . "
) * 6


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep ``datasets``' cache of the json/parquet builders out of the home folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def _scrambled_ids(total: int, seed: int = 0) -> torch.Tensor:
    """Distinct token ids, so every window tells where it starts."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed)) + 1000


def _start_of(window: torch.Tensor, ids: torch.Tensor) -> int:
    return int((ids == window[0]).nonzero().item())


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize(("total", "count", "length"), [(200, 8, 16), (50, 20, 7), (17, 3, 16)])
def test_random_windows_are_contiguous_slices(total, count, length):
    ids = _scrambled_ids(total)
    windows = random_windows(ids, count, length, seed=0)
    assert windows.shape == (count, length) and windows.dtype == ids.dtype
    for window in windows:
        start = _start_of(window, ids)
        assert 0 <= start <= total - length - 1  # one token is left for the last label
        assert torch.equal(window, ids[start : start + length])


def test_random_windows_single_possible_start():
    ids = _scrambled_ids(9)
    windows = random_windows(ids, 5, 8, seed=3)
    assert torch.equal(windows, ids[:8].expand(5, 8))


def test_random_windows_deterministic_per_seed():
    ids = _scrambled_ids(500)
    first = random_windows(ids, 6, 10, seed=7)
    assert torch.equal(first, random_windows(ids, 6, 10, seed=7))
    assert not torch.equal(first, random_windows(ids, 6, 10, seed=8))
    starts = {_start_of(w, ids) for w in random_windows(ids, 20, 10, seed=0)}
    assert len(starts) > 10  # starts are spread out, not one repeated window


@pytest.mark.parametrize("total", [0, 5, 16])
def test_random_windows_too_short_text(total):
    with pytest.raises(ValueError, match=r"shorter than one window of 16\+1"):
        random_windows(torch.arange(total), 2, 16)


@pytest.mark.parametrize(
    ("count", "length", "message"),
    [
        (0, 8, "number of windows"),
        (-1, 8, "number of windows"),
        (2.0, 8, "number of windows"),
        (2, 1, "sequence length"),
        (2, 8.0, "sequence length"),
    ],
)
def test_window_arguments_validated(count, length, message):
    with pytest.raises(ValueError, match=message):
        random_windows(torch.arange(100), count, length)
    with pytest.raises(ValueError, match=message):
        contiguous_windows(torch.arange(100), length, count)


@pytest.mark.parametrize(
    ("total", "length", "count", "expected_count"),
    [(100, 10, None, 10), (105, 10, None, 10), (100, 10, 3, 3), (8, 8, None, 1), (100, 7, 14, 14)],
)
def test_contiguous_windows(total, length, count, expected_count):
    ids = _scrambled_ids(total)
    windows = contiguous_windows(ids, length, count)
    assert windows.shape == (expected_count, length)
    for i, window in enumerate(windows):
        assert torch.equal(window, ids[i * length : (i + 1) * length])


def test_contiguous_windows_errors():
    with pytest.raises(ValueError, match="fewer than one window of 10"):
        contiguous_windows(torch.arange(9), 10)
    with pytest.raises(ValueError, match="asked for 11 windows of 10 tokens, text holds 10"):
        contiguous_windows(torch.arange(100), 10, 11)


@pytest.mark.parametrize(("windows", "world_size"), [(10, 1), (10, 2), (10, 3), (10, 4), (4, 4)])
def test_shard_for_rank_covers_every_window_once(windows, world_size):
    data_windows = _scrambled_ids(windows * 5).reshape(windows, 5)
    shards = [shard_for_rank(data_windows, rank, world_size) for rank in range(world_size)]
    assert torch.equal(torch.cat(shards), data_windows)
    sizes = [s.shape[0] for s in shards]
    assert sum(sizes) == windows and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_for_rank_needs_a_window_per_rank():
    with pytest.raises(ValueError, match="3 windows cannot be shared by 4 ranks"):
        shard_for_rank(torch.zeros(3, 5, dtype=torch.long), 0, 4)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".txt", ".raw", ".tokens"])
def test_read_text_file_plain(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    path.write_text("line one\n = Heading = \nline thrée\n", encoding="utf-8")
    assert read_text_file(path) == "line one\n = Heading = \nline thrée\n"
    assert read_text_file(str(path)) == read_text_file(path)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_read_text_file_jsonl_text_field(tmp_path):
    path = tmp_path / "records.jsonl"
    _write_jsonl(path, [{"text": "first", "id": 1}, {"text": "second", "id": 2}])
    assert read_text_file(path) == "first\n\nsecond"


def test_read_text_file_jsonl_custom_field(tmp_path):
    path = tmp_path / "records.jsonl"
    _write_jsonl(path, [{"body": "alpha", "n": 1}, {"body": "beta", "n": 2}])
    assert read_text_file(path, text_field="body") == "alpha\n\nbeta"
    with pytest.raises(ValueError, match=r"no 'text' field \(fields: \['body', 'n'\]\)"):
        read_text_file(path)


def test_read_text_file_alpaca_records(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    _write_jsonl(
        path,
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hello.", "input": "", "output": "Hello!"},
        ],
    )
    assert read_text_file(path) == "Add the numbers.\n2 and 3\n5\n\nSay hello.\nHello!"


def test_read_text_file_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": ["row one", "row two", "row three"], "n": [1, 2, 3]}), path)
    assert read_text_file(path) == "row one\n\nrow two\n\nrow three"


def test_read_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    odd = tmp_path / "table.csv"
    odd.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        read_text_file(odd)


class _FakeTable:
    def __init__(self, records):
        self.records = records

    def to_list(self):
        return self.records


def test_hub_fallback_errors_are_explained(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load Hub dataset 'someone/corpus'") as err:
        load_text("someone/corpus")
    assert "Offline?" in str(err.value) and "HF_SPARSE_DATA_DIR" in str(err.value)
    assert isinstance(err.value.__cause__, ConnectionError)

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _FakeTable([]))
    with pytest.raises(ValueError, match="someone/corpus:test holds no records"):
        load_text("someone/corpus", "evaluation")

    seen = []
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: seen.append((a, k)) or _FakeTable([{"text": "a"}, {"text": "b"}]),
    )
    assert load_text("someone/corpus") == "a\n\nb"
    assert seen == [(("someone/corpus", None), {"split": "train"})]


# --------------------------------------------------------------------------- load_text


def test_load_text_local_path_wins(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("my own text")
    assert load_text(path) == "my own text"
    assert load_text(str(path), "evaluation") == "my own text"


@pytest.mark.parametrize(
    "source", ["./no/such/file.txt", "/nowhere/data.jsonl", "~/nope.tokens", "missing.txt"]
)
def test_load_text_missing_path(source):
    with pytest.raises(FileNotFoundError, match="does not exist.*wikitext2"):
        load_text(source)


def test_load_text_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split must be 'calibration' or 'evaluation'"):
        load_text("wikitext2", "train")


@pytest.mark.skipif(data_dir() is None, reason="no local shared/data folder")
def test_load_text_wikitext2_local_copy():
    text = load_text("wikitext2", "evaluation")
    assert text.startswith(" \n = Robert Boulter = \n")
    assert text == (data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    calibration = load_text("wikitext2", "calibration")
    assert calibration.startswith(" \n = Homarus gammarus = \n")


def test_data_dir_env_override(tmp_path, monkeypatch):
    folder = tmp_path / "my data"
    (folder / "wikitext-2").mkdir(parents=True)
    (folder / "wikitext-2" / "wiki.valid.tokens").write_text(" = Local copy = \n tokens here \n")
    monkeypatch.setenv("HF_SPARSE_DATA_DIR", str(folder))
    assert data_dir() == folder
    assert load_text("wikitext2", "calibration") == " = Local copy = \n tokens here \n"
    monkeypatch.setenv("HF_SPARSE_DATA_DIR", "")  # empty means unset
    assert data_dir() != folder


def test_named_dataset_without_local_copy_goes_to_hub(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("HF_SPARSE_DATA_DIR", str(tmp_path))  # a folder without the file
    monkeypatch.setattr(data, "_load_hub_text", lambda *args: calls.append(args[:4]) or "hub text")
    assert load_text("wikitext2", "evaluation") == "hub text"
    assert load_text("lambada", "calibration") == "hub text"
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
        ("EleutherAI/lambada_openai", "default", "test", "text"),
    ]


# --------------------------------------------------------------------------- tokenizer paths


def test_tokenize_with_local_tokenizer(word_tokenizer):
    tokenizer = word_tokenizer(TEXT)
    vocab = tokenizer.get_vocab()
    ids = tokenize(tokenizer, TEXT)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == [vocab[w] for w in TEXT.split()]
    unknown = tokenize(tokenizer, "the zebra")
    assert unknown.tolist() == [vocab["the"], vocab["[UNK]"]]
    with pytest.raises(ValueError, match="empty"):
        tokenize(tokenizer, "  \n ")


def test_calibration_and_evaluation_windows(tmp_path, word_tokenizer):
    tokenizer = word_tokenizer(TEXT)
    vocab = tokenizer.get_vocab()
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    expected_ids = torch.tensor([vocab[w] for w in TEXT.split()])

    windows = calibration_windows(tokenizer, str(path), count=5, length=12, seed=4)
    assert windows.shape == (5, 12)
    assert torch.equal(windows, random_windows(expected_ids, 5, 12, seed=4))
    assert torch.equal(windows, calibration_windows(tokenizer, str(path), 5, 12, seed=4))
    assert not torch.equal(windows, calibration_windows(tokenizer, str(path), 5, 12, seed=5))

    evaluation = evaluation_windows(tokenizer, str(path), length=10, count=None)
    assert torch.equal(evaluation, expected_ids[: len(expected_ids) // 10 * 10].reshape(-1, 10))

    with pytest.raises(ValueError, match="window of 1000"):
        calibration_windows(tokenizer, str(path), count=2, length=1000)


@pytest.mark.skipif(data_dir() is None, reason="no local shared/data folder")
def test_calibration_windows_wikitext2(word_tokenizer):
    text = load_text("wikitext2", "calibration")
    tokenizer = word_tokenizer(text, max_vocab=128)
    windows = calibration_windows(tokenizer, "wikitext2", count=3, length=32, seed=0)
    assert windows.shape == (3, 32)
    assert int(windows.min()) >= 0 and int(windows.max()) < 128
    assert torch.equal(windows, random_windows(tokenize(tokenizer, text), 3, 32, seed=0))


# --------------------------------------------------------------------------- ptb and c4

PTB_TRAIN = " aer banknote berlitz calloway \n pierre <unk> N years old will join the board \n"
PTB_TEST = " no it was n't black monday \n but while the new york stock exchange did n't fall \n"


def _c4_records(prefix: str, count: int) -> str:
    rows = [
        {"text": f"{prefix} document {i}.", "timestamp": "2019", "url": "u"} for i in range(count)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)


def test_ptb_and_c4_resolve_to_local_files_in_the_documented_format(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_text(PTB_TRAIN)
    (tmp_path / "ptb" / "ptb.test.txt").write_text(PTB_TEST)
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4-train.00000-of-01024.json").write_text(_c4_records("train", 3))
    (tmp_path / "c4" / "c4-validation.00000-of-00008.json").write_text(_c4_records("val", 2))
    monkeypatch.setenv("HF_SPARSE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_load_hub_text", lambda *a: pytest.fail(f"went to the Hub: {a}"))

    assert load_text("ptb", "calibration") == PTB_TRAIN
    assert load_text("ptb", "evaluation") == PTB_TEST
    assert load_text("c4", "calibration") == "\n\n".join(f"train document {i}." for i in range(3))
    assert load_text("c4", "evaluation") == "val document 0.\n\nval document 1."
    assert [r["text"] for r in data.load_records("c4", limit=2)] == [
        "train document 0.",
        "train document 1.",
    ]
    data.check_data_source("ptb")  # known names pass the pre-flight check
    data.check_data_source("c4")


def test_ptb_and_c4_windows_from_local_files(tmp_path, monkeypatch, word_tokenizer):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_text(TEXT)
    (tmp_path / "ptb" / "ptb.test.txt").write_text(TEXT)
    monkeypatch.setenv("HF_SPARSE_DATA_DIR", str(tmp_path))
    tokenizer = word_tokenizer(TEXT)
    windows = calibration_windows(tokenizer, "ptb", count=4, length=8, seed=0)
    assert windows.shape == (4, 8)
    assert evaluation_windows(tokenizer, "ptb", length=8, count=3).shape == (3, 8)


def test_ptb_and_c4_hub_fallback_reads_the_right_files(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_SPARSE_DATA_DIR", str(tmp_path))  # no local copies
    seen = []

    def fake_load(*args, **kwargs):
        seen.append((args, kwargs))
        field = "sentence" if args[0].startswith("ptb") else "text"
        return _FakeTable([{field: "one"}, {field: "two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_text("ptb", "calibration") == "one\ntwo"  # PTB: one sentence per line
    assert load_text("ptb", "evaluation") == "one\ntwo"
    assert load_text("c4", "calibration") == "one\n\ntwo"
    assert load_text("c4", "evaluation") == "one\n\ntwo"
    assert seen == [
        (("ptb-text-only/ptb_text_only", "penn_treebank"), {"split": "train"}),
        (("ptb-text-only/ptb_text_only", "penn_treebank"), {"split": "test"}),
        (
            ("allenai/c4", None),
            {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
        ),
        (
            ("allenai/c4", None),
            {
                "split": "validation",
                "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
            },
        ),
    ]


def test_c4_hub_failure_names_the_shard(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_SPARSE_DATA_DIR", str(tmp_path))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"'allenai/c4'.*c4-validation.00000-of-00008") as err:
        load_text("c4", "evaluation")
    assert "HF_SPARSE_DATA_DIR" in str(err.value)


def test_unknown_name_close_to_ptb_is_suggested():
    with pytest.raises(ValueError, match="did you mean 'ptb'"):
        load_text("ptbb")
