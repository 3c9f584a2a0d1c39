"""lm-eval on local LAMBADA / HellaSwag-format files with a tiny in-memory model."""

from __future__ import annotations

import json

import pytest

from hf_sparse.analysis.downstream import downstream_eval, resolve_task_file
from tests.conftest import build_tiny_model, build_word_tokenizer

WORDS = "the cat sat on a mat and dog ran to park with ball then slept in sun"


def _files(tmp_path):
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text(
        "\n".join(json.dumps({"text": f"the cat sat on a mat and {w}"}) for w in ("dog", "ball"))
    )
    hellaswag = tmp_path / "hellaswag.jsonl"
    doc = {
        "activity_label": "Pets",
        "ctx_a": "the cat sat on a mat",
        "ctx_b": "and",
        "endings": ["dog ran", "ball slept", "sun [title] park", "the mat"],
        "label": 1,
    }
    hellaswag.write_text("\n".join(json.dumps(doc) for _ in range(3)))
    return {"lambada": lambada, "hellaswag": hellaswag}


@pytest.mark.slow  # lm-eval task set-up: ~15 s
def test_local_tasks_run_in_memory(tmp_path):
    tokenizer = build_word_tokenizer(WORDS)
    tokenizer.eos_token = "[UNK]"
    results = downstream_eval(
        build_tiny_model("llama"), tokenizer, limit=3, files=_files(tmp_path), batch_size=2
    )
    assert set(results) == {"lambada", "hellaswag"}
    assert 0 <= results["lambada"]["acc"] <= 1 and results["lambada"]["perplexity"] > 1
    assert 0 <= results["hellaswag"]["acc_norm"] <= 1


def test_missing_files_and_unknown_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown downstream task 'mmlu'"):
        resolve_task_file("mmlu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_task_file("lambada", tmp_path / "none.jsonl")
