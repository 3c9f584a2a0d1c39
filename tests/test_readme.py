"""Every Python block of README.md runs, as written, on tiny stand-ins.

The README's blocks use names the reader brings (README, "Use": ``path``, ``model``,
``tokenizer``, ``windows``, ``records``, ``ds``, ``args``, ...). The one substitution: before
each block, fresh tiny stand-ins for exactly those names (:func:`stand_ins`: a 4-layer Llama
with 1024 positions and a word-level tokenizer, a few token windows and records, fine-tuned
stand-ins of the base for merging) are put into the block's namespace. Everything else is the
README's code: the same calls with the same arguments. Blocks share one namespace in file order,
like cells of a notebook, so a block may use what an earlier one made (``golden``); each runs
in a temporary working directory, where the stand-in folders are.

A block that needs a name no stand-in provides fails with the name: add it to
:func:`stand_ins` (and to the README's list), or import it in the block. A block that names a
CUDA device (``"cuda"``) is skipped, with that reason, where CUDA is not available.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_model, build_word_tokenizer, tiny_training_args

README = Path(__file__).resolve().parents[1] / "README.md"
WORDS = (
    "the a of to and in is was for on with as by at from it his that an are were which be this "
    "give three tips staying healthy eat sleep walk story cat dog ran home day"
)
POSITIONS = 1024  # the README's windows are 512 tokens long
LAYERS = 4  # the README groups 4 layers (Basis Sharing)


def python_blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ``python`` block of the README."""
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
        blocks.append((text[: match.start()].count("\n") + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def tiny_llama(seed: int = 0):
    return build_tiny_model(
        "llama", seed=seed, max_position_embeddings=POSITIONS, num_hidden_layers=LAYERS
    )


def finetuned_copy(base_dir: Path, out: Path, seed: int) -> None:
    """A stand-in fine-tune: the base plus small seeded deltas on every weight."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)


def lora_adapter(base_dir: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    lora.save_pretrained(out)


def records(n: int = 24) -> list[dict[str, str]]:
    words = WORDS.split()
    return [
        {
            "instruction": " ".join(words[(i + k) % len(words)] for k in range(6)),
            "input": "",
            "output": " ".join(words[(3 * i + k) % len(words)] for k in range(8)),
        }
        for i in range(n)
    ]


def windows(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


class Examples(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The stand-in folders: a tiny base (``path``), two fine-tunes and a LoRA adapter."""
    root = tmp_path_factory.mktemp("readme")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    tokenizer = build_word_tokenizer(WORDS)
    tokenizer.add_special_tokens({"pad_token": "[PAD]", "eos_token": "[EOS]"})  # as real ones have
    tokenizer.save_pretrained(root / "base")
    finetuned_copy(root / "base", root / "ft_alpaca", seed=1)
    finetuned_copy(root / "base", root / "ft_stories", seed=2)
    lora_adapter(root / "base", root / "lora_wiki")
    return root


def stand_ins(root: Path) -> dict[str, object]:
    """Fresh tiny stand-ins for the names README's blocks leave to the reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from hf_sparse import SparseGPTConfig, WandaConfig

    def base_model():
        return AutoModelForCausalLM.from_pretrained(root / "base")

    return {
        "path": str(root / "base"),
        "model": base_model(),
        "base_model": base_model(),
        "tokenizer": AutoTokenizer.from_pretrained(root / "base"),
        "windows": windows(),
        "token_windows": windows(),
        "alpaca_windows": windows(seed=1),
        "stories_windows": windows(seed=2),
        "wiki_windows": windows(seed=3),
        "records": records(),
        "ds": Examples(windows(8, 16, seed=4)),
        "args": tiny_training_args(root / "trainer", max_steps=2),
        "Trainer": Trainer,
        "WandaConfig": WandaConfig,
        "SparseGPTConfig": SparseGPTConfig,
    }


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 8


@pytest.fixture(scope="module")
def namespace() -> dict[str, object]:
    return {"__name__": "readme"}


@pytest.mark.slow
@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, workdir, namespace, monkeypatch):
    if '"cuda"' in code and not torch.cuda.is_available():
        pytest.skip(f"README.md:{line} runs on a CUDA device; none here")
    monkeypatch.chdir(workdir)
    namespace.update(stand_ins(workdir))
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    except NameError as error:
        pytest.fail(f"README.md:{line} uses a name with no stand-in ({error}); add it to stand_ins")
