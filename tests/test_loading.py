"""One loader for every output kind (``hf_sparse.load_output``), ``hf-sparse eval`` on any of
them, and portable adapters: tiny models saved to folders, each adapter type evaluated from its
folder against the same adapter in memory.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_sparse import load_output
from hf_sparse.cli import main
from hf_sparse.data import evaluation_windows
from hf_sparse.evaluation import EvalSettings, evaluate_output, perplexity
from hf_sparse.loading import inspect_output, known_provenance, load_model_and_tokenizer
from hf_sparse.outputs import RESULTS_FILE
from tests.conftest import build_tiny_model, build_word_tokenizer
from tests.test_peft_contract import BASIS_SHARING, MASKED_LR, SPD, Case

WORDS = " ".join(f"w{i % 97} x{(i * 7) % 31}" for i in range(2000))
LENGTH, WINDOWS = 16, 4


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny llama base folder (with a word tokenizer) and a text to measure on."""
    root = tmp_path_factory.mktemp("loading")
    tokenizer = build_word_tokenizer(WORDS)
    tokenizer.eos_token = "[UNK]"
    base = root / "base"
    build_tiny_model("llama").save_pretrained(base)
    tokenizer.save_pretrained(base)
    (root / "text.txt").write_text(WORDS)
    return root


def settings(ws) -> EvalSettings:
    return EvalSettings(str(ws / "text.txt"), LENGTH, WINDOWS, batch_size=2)


def _lora(model, seed):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


METHODS = {  # the PEFT contract's methods and options (tests/test_peft_contract.py)
    "masked_lr": (MASKED_LR, {}),
    "basis_sharing": (BASIS_SHARING, {"ratio": 0.3}),
    "spd": (SPD, {}),
}


def make_adapter(ws, kind: str, folder):
    """The adapter on the base loaded from its folder (so it records that folder), nudged off
    its initial values and saved to ``folder`` without tokenizer files; returns it in memory."""
    base = AutoModelForCausalLM.from_pretrained(ws / "base")
    if kind == "lora":
        model = _lora(base, 0)
    else:
        method, options = METHODS[kind]
        model = method.adapt(base, Case(method, "llama", options), "default", 0)
        method.nudge(model, 0)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["masked_lr", "basis_sharing", "spd", "lora"])
def test_an_adapter_folder_evaluates_the_adapter(ws, tmp_path, kind):
    adapted = make_adapter(ws, kind, tmp_path / "made")
    elsewhere = tmp_path / "copied" / "adapter"  # portable: nothing points into its old folder
    shutil.copytree(tmp_path / "made", elsewhere)
    shutil.rmtree(tmp_path / "made")
    assert not any(elsewhere.glob("tokenizer*"))  # the base's tokenizer is used

    summary = evaluate_output(str(elsewhere), settings(ws))
    base, tokenizer = load_output(ws / "base")
    windows = evaluation_windows(tokenizer, str(ws / "text.txt"), LENGTH, WINDOWS)
    in_memory = perplexity(adapted, windows, 2, show_progress=False).perplexity
    dense = perplexity(base, windows, 2, show_progress=False).perplexity
    assert summary["kind"] == "adapter" and summary["base"] == str(ws / "base")
    assert math.isclose(summary["perplexity"], in_memory, rel_tol=1e-5), (summary, in_memory)
    assert not math.isclose(summary["perplexity"], dense, rel_tol=1e-3), (summary, dense)

    # stock peft on the copied folder, after import hf_sparse (done above)
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "base"), elsewhere)
    ids = windows[:2]
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        torch.testing.assert_close(stock.eval()(input_ids=ids).logits, expected)


def test_cli_eval_prints_the_adapters_own_perplexity(ws, tmp_path, capsys):
    adapted = make_adapter(ws, "lora", tmp_path / "lora")
    argv = ["eval", str(tmp_path / "lora"), "--dataset", str(ws / "text.txt"), "--batch-size",
            "2", "--sequence-length", str(LENGTH), "--num-windows", str(WINDOWS)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    _, tokenizer = load_output(ws / "base")
    windows = evaluation_windows(tokenizer, str(ws / "text.txt"), LENGTH, WINDOWS)
    expected = perplexity(adapted, windows, 2, show_progress=False).perplexity
    assert summary["kind"] == "adapter" and summary["peft_type"] == "LORA"
    assert math.isclose(summary["perplexity"], expected, rel_tol=1e-5)


def test_base_override_and_missing_base(ws, tmp_path):
    make_adapter(ws, "lora", tmp_path / "lora")
    config_file = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_file.write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"the base of LORA adapter .* pass base="):
        inspect_output(tmp_path / "lora")
    plan = inspect_output(tmp_path / "lora", base=str(ws / "base"))
    assert plan.base == str(ws / "base") and plan.tokenizer_source == str(ws / "base")


def test_a_model_without_tokenizer_files_takes_its_bases(ws, tmp_path):
    folder = tmp_path / "pruned"
    build_tiny_model("llama", seed=1).save_pretrained(folder)
    with pytest.raises(ValueError, match="no tokenizer files and records no base model"):
        inspect_output(folder)
    (folder / RESULTS_FILE).write_text(
        json.dumps({"kind": "pruning", "base_model": str(ws / "base")})
    )
    model, tokenizer = load_output(folder)
    assert tokenizer("w1 x7").input_ids and not model.training
    assert load_output(folder, base=str(ws / "base"))[1].vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: None, r"is not a model or adapter folder \(no config.json or adapter_config"),
        (lambda f: (f / RESULTS_FILE).write_text('{"kind": "analysis", "base_model": "m/x"}'),
         r"is an analysis study .* not a model; load the model it studied instead: m/x"),
        (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA"}'),
         r"has adapter_config.json but no adapter_model.safetensors"),
        (lambda f: (f / "config.json").write_text("{not json"), r"config.json|safetensors"),
    ],
    ids=["empty", "study", "adapter-without-weights", "broken-config"],
)  # fmt: skip
def test_a_folder_it_cannot_open_is_one_clear_error(tmp_path, make, message):
    folder = tmp_path / "out"
    folder.mkdir()
    make(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        inspect_output(folder)


@pytest.fixture
def known_tiny(ws, tmp_path, monkeypatch):
    """A known model (``tiny-known`` -> Hub id ``hf-sparse-test/tiny-llama``) whose local
    converted copy is the tiny base, with the Hub offline."""
    import huggingface_hub.constants

    from hf_sparse.real_model import KNOWN_MODELS, MARKER, KnownModel

    spec = KnownModel("tiny==1", "tiny", "tiny.Q4_1.gguf", "tiny", "hf-sparse-test/tiny-llama",
                      "0" * 64, "Q4_1")  # fmt: skip
    monkeypatch.setitem(KNOWN_MODELS, "tiny-known", spec)
    monkeypatch.setenv("HF_SPARSE_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "cache" / "models" / "tiny-known"
    shutil.copytree(ws / "base", copy)
    (copy / MARKER).write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return copy


@pytest.mark.parametrize("kind", ["masked_lr", "basis_sharing", "spd", "lora"])
def test_adapters_record_the_hub_id_and_load_offline_from_the_local_copy(
    known_tiny, tmp_path, kind
):
    model, _ = load_model_and_tokenizer("tiny-known")
    assert model.name_or_path == model.config._name_or_path == "hf-sparse-test/tiny-llama"
    if kind == "lora":
        adapted = _lora(model, 0)
    else:
        method, options = METHODS[kind]
        adapted = method.adapt(model, Case(method, "llama", options), "default", 0)
        method.nudge(adapted, 0)
    adapted.eval().save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == "hf-sparse-test/tiny-llama"
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "adapter" / "README.md")  # peft's card, or ours
    assert card.data.base_model == "hf-sparse-test/tiny-llama"

    plan = inspect_output(tmp_path / "adapter")  # offline: the Hub id -> the local copy
    assert plan.base == str(known_tiny) and plan.base_name == "hf-sparse-test/tiny-llama"
    loaded, _ = plan.load()
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, adapted(input_ids=ids).logits)


def test_the_known_model_table_says_where_our_copy_comes_from():
    text = known_provenance("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert text == known_provenance("smollm2-135m")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1" in text and "not the Hub's own" in text
    assert known_provenance("gpt2") is None


def test_an_unknown_hub_id_offline_is_one_line_naming_the_setting(known_tiny):
    with pytest.raises(FileNotFoundError, match=r"'some-org/model' is not a local folder .* "
                       r"HF_HUB_OFFLINE is set: pass a local folder"):  # fmt: skip
        inspect_output("some-org/model")


def test_verbs_that_need_a_plain_model_get_the_adapter_merged(ws, tmp_path):
    """``load_model_and_tokenizer`` (prune, analyze, compress, mask jobs) on an adapter
    folder: the base with the adapter merged in, a plain transformers model."""
    adapted = make_adapter(ws, "masked_lr", tmp_path / "adapter")
    model, _ = load_model_and_tokenizer(str(tmp_path / "adapter"))
    assert not isinstance(model, PeftModel)
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted(input_ids=ids).logits)


@pytest.mark.slow  # lm-eval task set-up: ~15 s
def test_cli_eval_runs_lm_eval_tasks_on_the_local_files(ws, tmp_path, capsys, monkeypatch):
    make_adapter(ws, "lora", tmp_path / "lora")
    data = tmp_path / "data"
    (data / "lambada").mkdir(parents=True)
    lines = [json.dumps({"text": f"w{i} x{i % 31} w{i + 1} x{(i + 1) % 31}"}) for i in range(4)]
    (data / "lambada" / "lambada_test.jsonl").write_text("\n".join(lines))
    monkeypatch.setenv("HF_SPARSE_DATA_DIR", str(data))
    argv = ["eval", str(tmp_path / "lora"), "--dataset", str(ws / "text.txt"), "--tasks",
            "lambada", "--limit", "3", "--sequence-length", "16", "--num-windows", "2"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert 0 <= summary["tasks"]["lambada"]["acc"] <= 1
    assert summary["tasks"]["lambada"]["perplexity"] > 1


def test_cli_eval_of_a_model_with_the_layer_table(ws, capsys):
    argv = ["eval", str(ws / "base"), "--dataset", str(ws / "text.txt"), "--layers",
            "--sequence-length", str(LENGTH), "--num-windows", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    table, _, rest = out.partition("\n{")
    assert "model.layers.0.mlp.down_proj" in table and "overall" in table
    summary = json.loads("{" + rest)
    assert summary["kind"] == "model" and summary["linear_sparsity"] == 0


def test_an_output_holding_its_adapter_in_a_subfolder_loads_as_that_adapter(ws, tmp_path):
    """SPD's output: ``<dir>/adapter/`` beside the run's results file."""
    from hf_sparse.push import plan_upload

    adapted = make_adapter(ws, "spd", tmp_path / "out" / "adapter")
    (tmp_path / "out" / RESULTS_FILE).write_text(json.dumps({"kind": "spd"}))
    plan = inspect_output(tmp_path / "out")
    assert plan.kind == "adapter" and plan.path == str(tmp_path / "out" / "adapter")
    model, _ = plan.load()
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"incomplete nested folder \(missing \['README.md'\]"):
        plan_upload(tmp_path / "out", "me/x")  # the card goes at the top
    (tmp_path / "out" / "README.md").write_text("card")
    names = [name for name, _ in plan_upload(tmp_path / "out", "me/x").files]
    assert "adapter/adapter_model.safetensors" in names and "README.md" in names
