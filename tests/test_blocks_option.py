"""``--blocks`` on every command that walks decoder blocks (prune, mask score/golden/reverse,
analyze, compress, decompose, merge) and ``blocks=`` on ``TaskVectorPruneCallback`` and
``SensitivityCallback``.

The model is a tiny Llama registered as a family whose classes name no decoder-layer class in
``_no_split_modules``: its blocks are found only when ``--blocks model.layers`` says where they
are. Each command fails without it (one line naming ``_no_split_modules`` and ``--blocks``),
fails on a wrong path (one line listing the ModuleLists there are), writes nothing either
time, and runs with the right path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    build_word_tokenizer,
    make_token_windows,
    tiny_config,
    tiny_training_args,
)
from hf_sparse.callbacks import SensitivityCallback, TaskVectorPruneCallback
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
)

from hf_sparse.analysis import SensitivityConfig
from hf_sparse.blocks import UnsupportedArchitectureError, find_decoder_blocks
from hf_sparse.cli import main
from hf_sparse.merging import TaskVectorPruneConfig
from hf_sparse.spd import SPDConfig, get_spd_model
from hf_sparse.spd.objective import prefix_replay

WORDS = " ".join(f"w{i % 97}" for i in range(400))


class HiddenBlocksConfig(LlamaConfig):
    model_type = "hf_sparse_hidden_blocks"


class HiddenBlocksForCausalLM(LlamaForCausalLM):
    """A Llama whose classes list no `_no_split_modules`, as some remote-code families do."""

    config_class = HiddenBlocksConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        self._no_split_modules = []
        self.model._no_split_modules = []


AutoConfig.register(HiddenBlocksConfig.model_type, HiddenBlocksConfig, exist_ok=True)
AutoModelForCausalLM.register(HiddenBlocksConfig, HiddenBlocksForCausalLM, exist_ok=True)


def hidden_blocks_model(seed: int = 0) -> HiddenBlocksForCausalLM:
    values = tiny_config("llama").to_dict()
    values.pop("model_type", None)
    torch.manual_seed(seed)
    return HiddenBlocksForCausalLM(HiddenBlocksConfig(**values)).eval()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The hidden-blocks model, two fine-tunes of it, a text file and the recipes."""
    root = tmp_path_factory.mktemp("blocks")
    (root / "text.txt").write_text(WORDS)
    tokenizer = build_word_tokenizer(WORDS)
    base = hidden_blocks_model()
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for index in range(2):
        tuned = hidden_blocks_model()
        generator = torch.Generator().manual_seed(10 + index)
        with torch.no_grad():
            for name, param in tuned.named_parameters():
                if ".layers." in name and param.ndim == 2:
                    param.add_(0.02 * torch.randn(param.shape, generator=generator))
        tuned.save_pretrained(root / f"ft{index}")
    recipes = {
        "merge.yaml": "merge_method: sparsegpt_tv\nbase_model: {m}\nmodels: [{{model: {r}/ft0}}, "
        "{{model: {r}/ft1}}]\nparameters: {{density: 0.5}}\ncalibration: {{dataset: {t}, "
        "num_samples: 2, sequence_length: 16}}\n",
        # layer 1 decomposed: the blocks before it are replayed, which needs the block list
        "spd.yaml": "model: {m}\nspd: {{C: 2, target_modules: [model.layers.1.mlp.up_proj]}}\n"
        "train: {{steps: 2, batch_size: 2}}\n"
        "data: {{source: {t}, count: 2, length: 16, eval_count: 1}}\n",
        "analysis.yaml": "model: {m}\nanalysis: {{metric: magnitude, top_k: 20, dataset: {t}, "
        "eval_dataset: {t}, num_samples: 2, sequence_length: 16, eval_windows: 1, "
        "eval_length: 16, control_seeds: 1, stability_seeds: [0], stability_subsets: 0, "
        "single_weight_candidates: 0, n_clusters: 2}}\n",
    }
    for name, text in recipes.items():
        (root / name).write_text(text.format(m=root / "model", r=root, t=root / "text.txt"))
    return root


SMALL = ("--dataset", "{t}", "--num-samples", "2", "--sequence-length", "16")
MASK = ("--dataset", "{t}", "--num-samples", "2", "--max-length", "16")
COMMANDS = {
    "prune": ("prune", "{m}", "--method", "wanda", "--sparsity", "0.5", *SMALL, "--no-eval"),
    "mask-score": ("mask", "score", "{m}", "--top-k-percent", "10", *MASK),
    "mask-golden": ("mask", "golden", "{m}", "--top-k-percent", "20", *MASK),
    "mask-reverse": ("mask", "reverse", "{m}", "--rounds", "1", "--patience", "1",
                     "--eval-samples", "1", *MASK),
    "analyze": ("analyze", "{r}/analysis.yaml"),
    "compress": ("compress", "--model", "{m}", "--ratio", "0.2", *SMALL, "--no-eval"),
    "decompose": ("decompose", "{r}/spd.yaml"),
    "merge": ("merge", "{r}/merge.yaml"),
}  # fmt: skip
# SPD only uses the block list to skip the undecomposed first blocks on repeated passes, so
# it runs without it (every pass then runs the whole model); a wrong path is still an error.
NEEDS_BLOCKS = set(COMMANDS) - {"decompose"}


def run(ws, command: str, out, *extra: str) -> int:
    argv = [a.format(m=ws / "model", r=ws, t=ws / "text.txt") for a in COMMANDS[command]]
    return main([*argv, *extra, "--output-dir", str(out)])


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.fixture(autouse=True)
def _word_tokenizer(monkeypatch):
    # The folder holds our word-level tokenizer file: load it as it is.
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", PreTrainedTokenizerFast.from_pretrained)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_without_blocks_or_with_a_wrong_path_says_so(ws, command, tmp_path, capsys):
    out = tmp_path / "out"
    if command in NEEDS_BLOCKS:
        assert run(ws, command, out) == 2
        line = last_error_line(capsys)
        assert "_no_split_modules" in line and "--blocks" in line and "'model.layers'" in line
        assert not out.exists()
    assert run(ws, command, out, "--blocks", "model.layerz") == 2
    line = last_error_line(capsys)
    assert "blocks='model.layerz' matches no ModuleList" in line and "model.layers" in line
    assert not list(tmp_path.iterdir())  # nothing written, no temporary folder left


@pytest.mark.parametrize(
    "command",
    # a whole critical-weight study with its report: ~10 s
    [pytest.param(c, marks=pytest.mark.slow) if c == "analyze" else c for c in sorted(COMMANDS)],
)
def test_command_runs_with_blocks(ws, command, tmp_path):
    out = tmp_path / "out"
    assert run(ws, command, out, "--blocks", "model.layers") == 0
    assert out.is_dir() and any(out.iterdir())
    assert "model.layers" in (out / "recipe.yaml").read_text()  # the rerun keeps it


def test_decompose_refuses_blocks_for_a_toy_experiment(tmp_path, capsys):
    argv = ["decompose", "tms_5-2", "--blocks", "model.layers", "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--blocks applies to language-model recipes" in last_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_pruned_output_of_blocks_flag_reloads(ws, tmp_path):
    assert run(ws, "prune", tmp_path / "out", "--blocks", "re:^model\\.layers$") == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    weights = [m.weight for n, m in pruned.named_modules() if n.startswith("model.layers.")
               and isinstance(m, torch.nn.Linear)]  # fmt: skip
    assert len(weights) == 14
    assert all((w == 0).float().mean() == pytest.approx(0.5) for w in weights)


def _examples() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w, "labels": w.clone()} for w in make_token_windows(n=8, length=12)]


def _train_with(callback, output_dir):
    """Two steps of a Trainer on the model whose blocks only ``blocks=`` finds; the callback."""
    args = tiny_training_args(output_dir, max_steps=2)
    trainer = Trainer(model=hidden_blocks_model(), args=args, train_dataset=_examples(),
                      callbacks=[callback])  # fmt: skip
    trainer.train()
    return callback


def test_task_vector_prune_callback_takes_blocks(tmp_path):
    def train(blocks: str | None) -> TaskVectorPruneCallback:
        config = TaskVectorPruneConfig(density=0.25, calibration_samples=4, blocks=blocks)
        return _train_with(TaskVectorPruneCallback(config), tmp_path / str(blocks))

    with pytest.raises(UnsupportedArchitectureError, match="_no_split_modules.*blocks="):
        train(None)
    with pytest.raises(UnsupportedArchitectureError, match="'model.layerz' matches no ModuleList"):
        train("model.layerz")
    callback = train("model.layers")
    assert len(callback.base_weights) == 14 and callback.hessians
    assert (tmp_path / "model.layers" / "pruned_task_vector" / "adapter_model.safetensors").exists()


def test_sensitivity_callback_takes_blocks(tmp_path):
    def train(blocks: str | None) -> SensitivityCallback:
        config = SensitivityConfig(metric="magnitude", steps=[0, 2], num_samples=2, blocks=blocks)
        return _train_with(SensitivityCallback(config), tmp_path / str(blocks))

    with pytest.raises(UnsupportedArchitectureError, match="_no_split_modules.*blocks="):
        train(None)
    with pytest.raises(UnsupportedArchitectureError, match="'model.layerz' matches no ModuleList"):
        train("model.layerz")
    assert train("model.layers").drift["steps"] == [0, 2]


def test_spd_prefix_replay_uses_blocks_under_the_peft_wrapper():
    model = get_spd_model(
        hidden_blocks_model(), SPDConfig(C=2, target_modules=["model.layers.1.mlp.up_proj"])
    )
    assert prefix_replay(model) is None  # not found: every pass runs the whole model
    replay = prefix_replay(model, "model.layers")  # base_model.model.model.layers
    assert replay is not None and replay.blocks == [model.base_model.model.model.layers[0]]
    with pytest.raises(UnsupportedArchitectureError, match="'model.layerz' matches no"):
        prefix_replay(model, "model.layerz")


def test_blocks_path_under_a_wrapper_must_be_unambiguous():
    pair = torch.nn.ModuleDict({"a": hidden_blocks_model(), "b": hidden_blocks_model()})
    with pytest.raises(UnsupportedArchitectureError, match="ends several ModuleList paths"):
        find_decoder_blocks(pair, "model.layers")
    found = find_decoder_blocks(pair, "b.model.layers")
    assert [name for name, _ in found] == ["b.model.layers.0", "b.model.layers.1"]
    wrapped = torch.nn.ModuleDict({"wrapper": pair["a"]})
    assert find_decoder_blocks(wrapped, "model.layers")[1][0] == "wrapper.model.layers.1"


def test_decompose_language_model_recipe_accepts_no_plots(ws, tmp_path):
    # a language-model SPD recipe draws no figures: --no-plots is accepted and changes nothing
    assert run(ws, "decompose", tmp_path / "out", "--no-plots") == 0
    assert (tmp_path / "out" / "recipe.yaml").is_file()
