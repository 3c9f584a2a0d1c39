"""Downstream tasks through lm-eval on local files (no Hub): LAMBADA (OpenAI) and HellaSwag.

Task definitions are built in memory (``dataset_path: json`` with absolute ``data_files``), so
lm-eval never downloads anything; the model runs in memory through ``HFLM``. HellaSwag
documents get lm-eval's own preprocessing (query = activity label + contexts, bracketed
artefacts removed), scored by ``acc`` and ``acc_norm``; LAMBADA scores the last word by
``acc`` and ``perplexity``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..data import data_dir

logger = logging.getLogger(__name__)

DOWNSTREAM_TASKS = ("lambada", "hellaswag")
DEFAULT_FILES = {
    "lambada": "lambada/lambada_test.jsonl",
    "hellaswag": "hellaswag/hellaswag_val_sample1000.jsonl",
}


def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_docs(dataset):
    def one(doc: dict) -> dict:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean(doc["activity_label"] + ": " + context),
            "choices": [_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


def task_config(task: str, path: str | os.PathLike) -> dict[str, Any]:
    """An lm-eval task definition of ``task`` reading the local jsonl ``path``."""
    path = str(Path(path).expanduser().resolve())
    if task == "lambada":
        return {
            "task": "hf_sparse_lambada",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": path}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
            "doc_to_target": "{{' '+text.split(' ')[-1]}}",
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    if task == "hellaswag":
        return {
            "task": "hf_sparse_hellaswag",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": path}},
            "validation_split": "validation",
            "output_type": "multiple_choice",
            "process_docs": _hellaswag_docs,
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{gold}}",
            "doc_to_choice": "choices",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    raise ValueError(f"unknown downstream task {task!r}; valid: {list(DOWNSTREAM_TASKS)}")


def resolve_task_file(task: str, path: str | os.PathLike | None = None) -> Path:
    if task not in DOWNSTREAM_TASKS:
        raise ValueError(f"unknown downstream task {task!r}; valid: {list(DOWNSTREAM_TASKS)}")
    if path is not None:
        resolved = Path(path).expanduser()
    else:
        local = data_dir()
        if local is None:
            raise FileNotFoundError(
                f"no local copy of {task}: pass its jsonl path or set HF_SPARSE_DATA_DIR "
                "(lm-eval is run on local files only)"
            )
        resolved = local / DEFAULT_FILES[task]
    if not resolved.exists():
        raise FileNotFoundError(f"{task} data file {resolved} does not exist")
    return resolved


def downstream_eval(
    model: nn.Module,
    tokenizer,
    tasks: tuple[str, ...] = DOWNSTREAM_TASKS,
    limit: int | None = 500,
    files: dict[str, str | os.PathLike] | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` (in memory) on the first ``limit`` examples."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    files = files or {}
    configs = [task_config(t, resolve_task_file(t, files.get(t))) for t in tasks]
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = simple_evaluate(model=lm, tasks=configs, limit=limit, log_samples=False)
    finally:
        model.train(was_training)
    results = {}
    for task, config in zip(tasks, configs, strict=True):
        raw = output["results"][config["task"]]
        results[task] = {
            key.split(",")[0]: float(value)
            for key, value in raw.items()
            if "," in key and "stderr" not in key
        }
    return results
