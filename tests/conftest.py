"""Shared fixtures: tiny seeded random models of every supported architecture, token windows.

Sizes are multiples of 8 so N:M masks (2:4, 4:8) fit every linear layer's input dimension.
``ARCHS`` (six families) is what most tests run on; ``ALL_ARCHS`` is the wider table of
families users bring (``tests/test_architectures.py`` runs every method on each).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Fixtures that live in plain modules (sub-folders hold no conftest.py of their own, so that
# `from conftest import ...` always means this file).
pytest_plugins = ["tests.merging.family"]

ARCHS = ["llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox"]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "granitemoe"]
ALL_ARCHS = [
    *ARCHS,
    "qwen3",
    *MOE_ARCHS,
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "olmo2",
    "stablelm",
    "falcon",
    "gptj",
    "bloom",
    "granite",
    "smollm3",
    "cohere",
    "cohere2",
]

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
_HEAD_DIM = HIDDEN // HEADS  # families whose default head_dim is that of a large model
_SMALL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # defaults lie outside VOCAB
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
SLIDING_WINDOW = 4  # shorter than the test windows, so sliding and global layers differ
_SLIDING_THEN_GLOBAL = dict(
    sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"]
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
    # The wider table (ALL_ARCHS).
    "qwen3": {**_LLAMA_LIKE, "head_dim": _HEAD_DIM},
    "mixtral": {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_LLAMA_LIKE, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {**_LLAMA_LIKE, **_MOE, "num_experts": 4, "head_dim": _HEAD_DIM},
    "granitemoe": {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma": {**_LLAMA_LIKE, "head_dim": _HEAD_DIM},
    "gemma2": {**_LLAMA_LIKE, **_SLIDING_THEN_GLOBAL, "head_dim": _HEAD_DIM},
    # Gemma-3 also has a rotary table per layer type (local and global rope_theta).
    "gemma3_text": {**_LLAMA_LIKE, **_SLIDING_THEN_GLOBAL, "head_dim": _HEAD_DIM},
    "cohere2": {**_LLAMA_LIKE, **_SLIDING_THEN_GLOBAL, **_SMALL_IDS},
    "phi": _LLAMA_LIKE,
    "phi3": {**_LLAMA_LIKE, **_SMALL_IDS},  # fused qkv_proj and gate_up_proj
    "olmo2": {**_LLAMA_LIKE, **_SMALL_IDS},
    "stablelm": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "smollm3": {**_LLAMA_LIKE, **_SMALL_IDS},
    "cohere": {**_LLAMA_LIKE, **_SMALL_IDS},
    "falcon": dict(  # multi-query attention, fused query_key_value
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_hidden_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "gptj": dict(
        n_embd=HIDDEN,
        n_inner=INTERMEDIATE,
        n_layer=LAYERS,
        n_head=HEADS,
        rotary_dim=_HEAD_DIM // 2,
        n_positions=MAX_POSITIONS,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    ),
    "bloom": dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),  # MLP is 4 x hidden
}


def tiny_config(arch: str, **overrides):
    """A tiny config of ``arch`` (see ``TINY_CONFIGS``), eager attention, ``VOCAB`` tokens."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {arch!r}; known: {sorted(TINY_CONFIGS)}")
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


def avoid_expert(expert: int):
    """Forward hook for a Mixtral-style top-k router: route as usual but never to ``expert``
    (an expert that sees no calibration token)."""

    def hook(module, _args, output):
        router_logits, scores, _ = output
        masked = router_logits.clone()
        masked[:, expert] = float("-inf")
        top, indices = torch.softmax(masked.float(), dim=-1).topk(module.top_k, dim=-1)
        return router_logits, (top / top.sum(-1, keepdim=True)).to(scores.dtype), indices

    return hook


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
def one_thread():
    """torch on one thread for the test (the results do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
