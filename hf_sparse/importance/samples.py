"""Turning user data into per-sample model inputs, and prompt functions for text / instructions."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..data import check_sequence_length, check_token_windows, vocabulary_size

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)

PromptFn = Callable[[Any], Mapping[str, Any]]


def _as_row(value: Any, field: str, where: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(
            f"{where}: {field} holds {tensor.dtype} values; token ids (and labels) must be "
            "integers: pass the tokenizer's output"
        )
    tensor = tensor.long()
    if tensor.ndim == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(
            f"{where}: {field} must be a non-empty 1-D token list, got {tuple(tensor.shape)}"
        )
    return tensor


def sample_from_mapping(item: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """One sample ``{"input_ids": [1, L], "labels": [1, L]}`` from a dict of token lists."""
    if "input_ids" not in item:
        raise ValueError(
            f"{where}: no 'input_ids' (fields: {sorted(item)}); pass prompt_fn= to turn raw "
            "examples into input_ids and labels (text_prompt_fn / instruction_prompt_fn)"
        )
    ids = _as_row(item["input_ids"], "input_ids", where)
    labels = item.get("labels")
    labels = ids.clone() if labels is None else _as_row(labels, "labels", where)
    if labels.shape != ids.shape:
        raise ValueError(
            f"{where}: input_ids has {ids.numel()} tokens but labels has {labels.numel()}; "
            "a prompt function must return labels of the same length (-100 on prompt tokens)"
        )
    if not bool((labels != IGNORE_INDEX).any()) or ids.numel() < 2:
        raise ValueError(f"{where}: no token carries a loss (all labels are -100 or 1 token)")
    return {"input_ids": ids.unsqueeze(0), "labels": labels.unsqueeze(0)}


def as_samples(batches: Any) -> list[dict[str, torch.Tensor]]:
    """Per-sample inputs from a ``[n, L]`` tensor of windows or an iterable of dicts.

    A dict may hold one sample (1-D lists) or a batch (2-D, with an optional attention mask
    whose zeros are dropped).
    """
    if isinstance(batches, torch.Tensor):
        check_token_windows(batches, None, "batches")
        if batches.shape[1] < 2:
            raise ValueError(f"token windows must be [n, L>=2], got {tuple(batches.shape)}")
        return [{"input_ids": w.unsqueeze(0), "labels": w.unsqueeze(0).clone()} for w in batches]
    if batches is None or isinstance(batches, str | bytes):
        raise ValueError("batches must be a [n, L] token tensor or an iterable of dicts")
    samples = []
    for i, item in enumerate(batches if isinstance(batches, Iterable) else []):
        if not isinstance(item, Mapping):
            raise ValueError(f"item {i} is a {type(item).__name__}; expected a dict of input_ids")
        ids = torch.as_tensor(item["input_ids"]) if "input_ids" in item else None
        if ids is not None and ids.ndim == 2:
            labels = item.get("labels")
            attention = item.get("attention_mask")
            for row in range(ids.shape[0]):
                keep = torch.as_tensor(attention[row]).bool() if attention is not None else None
                row_ids = ids[row][keep] if keep is not None else ids[row]
                row_labels = None
                if labels is not None:
                    row_labels = torch.as_tensor(labels[row])
                    row_labels = row_labels[keep] if keep is not None else row_labels
                samples.append(
                    sample_from_mapping(
                        {"input_ids": row_ids, "labels": row_labels}, f"item {i} row {row}"
                    )
                )
        else:
            samples.append(sample_from_mapping(item, f"item {i}"))
    if not samples:
        raise ValueError("no samples: the dataset / batches are empty")
    return samples


def check_samples(samples: list[dict[str, torch.Tensor]], model, where: str = "batches") -> None:
    """Every sample's ids inside the model's vocabulary and no longer than its positions."""
    vocab = vocabulary_size(model)
    for i, sample in enumerate(samples):
        ids = sample["input_ids"]
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(
                f"{where}: sample {i} holds token id {low if low < 0 else high}, outside the "
                f"model's vocabulary (ids 0..{vocab - 1 if vocab else '?'}); were the samples "
                "made with another model's tokenizer?"
            )
        check_sequence_length(model, ids.shape[-1], f"{where}: sample {i} length")


def first_samples(batches: Any, count: int, purpose: str) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` samples of collated batches (e.g. a train dataloader), padding
    removed, reading no more batches than needed; an error naming ``purpose`` if empty."""
    samples: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        samples.extend(as_samples([batch]))
        if len(samples) >= count:
            break
    if not samples:
        raise ValueError(f"the train dataloader is empty: no samples for {purpose}")
    return samples[:count]


def apply_prompt_fn(
    dataset: Sequence[Any], prompt_fn: PromptFn | None, limit: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """``prompt_fn`` applied to the first ``limit`` examples, checked, as samples."""
    if dataset is None or len(dataset) == 0:
        raise ValueError("the dataset is empty: give at least one example")
    examples = itertools.islice(dataset, limit)  # only the examples used are read
    samples = []
    for i, example in enumerate(examples):
        if prompt_fn is not None:
            example = prompt_fn(example)
        if not isinstance(example, Mapping):
            raise ValueError(
                f"example {i} is a {type(example).__name__}; pass prompt_fn= to turn examples "
                "into dicts of input_ids and labels (text_prompt_fn / instruction_prompt_fn)"
            )
        samples.append(sample_from_mapping(example, f"example {i}"))
    return samples


def text_prompt_fn(tokenizer, max_length: int = 512) -> PromptFn:
    """Plain text -> input_ids (cut to ``max_length``), loss on every token."""

    def prompt(example: Any) -> dict[str, list[int]]:
        text = example if isinstance(example, str) else example.get("text")
        if not isinstance(text, str):
            raise ValueError(f"text_prompt_fn needs a str or a dict with 'text', got {example!r}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        return {"input_ids": ids, "labels": list(ids)}

    return prompt


ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def instruction_prompt_fn(tokenizer, max_length: int = 512) -> PromptFn:
    """Alpaca records (instruction, input, output) -> ids with the loss on the response only."""

    def prompt(example: Mapping[str, Any]) -> dict[str, list[int]]:
        if not isinstance(example, Mapping) or "instruction" not in example:
            raise ValueError(
                f"instruction_prompt_fn needs records with 'instruction' and 'output', got "
                f"{example!r:.80}"
            )
        extra = example.get("input") or ""
        head = ALPACA_TEMPLATE.format(
            instruction=example["instruction"],
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        answer = str(example.get("output", ""))
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer_ids = [*answer_ids, tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):  # prompt alone fills max_length
            keep = max(1, max_length // 2)
            ids = (prompt_ids[-(max_length - keep) :] + answer_ids)[:max_length]
            labels = ([IGNORE_INDEX] * (max_length - keep) + answer_ids)[:max_length]
        return {"input_ids": ids, "labels": labels}

    return prompt
