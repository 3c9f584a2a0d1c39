"""Shared fixtures: tiny seeded random models of every supported architecture, token windows.

Sizes are multiples of 8 so N:M masks (2:4, 4:8) fit every linear layer's input dimension.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Fixtures that live in plain modules (sub-folders hold no conftest.py of their own, so that
# `from conftest import ...` always means this file).
pytest_plugins = ["tests.merging.family"]

ARCHS = ["llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox"]

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
VOCAB = 128
MAX_POSITIONS = 128

_LLAMA_LIKE = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POSITIONS,
    tie_word_embeddings=False,
)

# Keyword arguments of ``AutoConfig.for_model`` per architecture.
TINY_CONFIGS: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": None},
    "qwen2": _LLAMA_LIKE,
    "opt": dict(
        hidden_size=HIDDEN,
        word_embed_proj_dim=HIDDEN,
        ffn_dim=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "gpt2": dict(
        n_embd=HIDDEN,
        n_inner=INTERMEDIATE,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=MAX_POSITIONS,
        bos_token_id=VOCAB - 1,  # the default 50256 lies outside the tiny vocabulary
        eos_token_id=VOCAB - 1,
    ),
    "gpt_neox": dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
    ),
}


def tiny_config(arch: str, **overrides):
    """A tiny config of ``arch`` (see ``TINY_CONFIGS``), eager attention, ``VOCAB`` tokens."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {arch!r}; known: {ARCHS}")
    kwargs = {"vocab_size": VOCAB, **TINY_CONFIGS[arch], **overrides}
    config = AutoConfig.for_model(arch, **kwargs)
    config._attn_implementation = "eager"
    return config


def build_tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Random ``AutoModelForCausalLM`` of ``arch`` with seeded weights, in eval mode."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def make_token_windows(vocab: int = VOCAB, n: int = 4, length: int = 16, seed: int = 0):
    """``[n, length]`` random token ids below ``vocab``, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=generator, dtype=torch.long)


def build_word_tokenizer(text: str, max_vocab: int = VOCAB):
    """A whitespace word-level ``PreTrainedTokenizerFast`` built in memory (no Hub).

    Id 0 is ``[UNK]``; the first ``max_vocab - 1`` distinct words of ``text`` (by first
    appearance) get ids 1, 2, ... so ids fit a tiny model's vocabulary.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for word in text.split():
        if len(vocab) >= max_vocab:
            break
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def tiny_training_args(output_dir, **overrides):
    """``TrainingArguments`` for a few CPU steps on tiny models (no saving, no logging)."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture
def tiny_model():
    """Factory fixture: ``tiny_model("llama")`` -> a fresh seeded tiny model of that family."""
    return build_tiny_model


@pytest.fixture
def token_windows():
    """Factory fixture: ``token_windows(vocab, n, length, seed)`` -> ``[n, length]`` ids."""
    return make_token_windows


@pytest.fixture
def word_tokenizer():
    """Factory fixture: ``word_tokenizer(text, max_vocab)`` -> an in-memory word tokenizer."""
    return build_word_tokenizer
