"""Model cards: one table of cases, one card per registered kind, each validated the same way.

Every kind in ``hf_sparse.card_kinds.CARD_KINDS`` has a row: a results record and recipe shaped
like the ones its pipeline or callback writes (figures included), rendered through
``write_outputs`` (the save-time path) and checked: the metadata parses with
``huggingface_hub.ModelCard``; ``base_model`` is the Hub id of the real model's known name with
the Hub's ``base_model_relation``; the library tag has one spelling plus the method's;
``datasets`` and ``model-index`` hold the output's own figures with dataset and split, and never
the base's; the text says the base was dequantized from a Q4_1 GGUF, how to install and load
it, and embeds the recipe. Then the PEFT save path (our three adapter types replace peft's
stock card; other adapters keep it) and where the base's Hub id and provenance come from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

from hf_sparse.card_kinds import CARD_KINDS, dataset_ref, resolve_kind
from hf_sparse.cards import (
    REPO_ID_PLACEHOLDER,
    card_metadata,
    describe_base,
    render_card,
    with_repo_id,
    write_card,
)
from hf_sparse.outputs import results_record, write_outputs
from hf_sparse.real_model import KNOWN_MODELS, MARKER
from tests.conftest import build_tiny_model, make_token_windows

HUB_ID = KNOWN_MODELS["smollm2-135m"].hub_id
EVAL = {"dataset": "wikitext2", "sequence_length": 512, "num_windows": 32}


def ppl(value: float) -> dict:
    return {"perplexity": value, "mean_nll": 3.0, "predicted_tokens": 16352, "windows": 32}


@dataclass(frozen=True)
class Row:
    kind: str  # the card kind the output must get
    record: dict
    recipe: dict | None
    peft_type: str | None = None
    relation: str | None = None  # base_model_relation (None: the Hub defines none for it)
    library: str = "transformers"
    tag: str = ""  # the method's tag
    own: tuple = ()  # (metric type, value) pairs that model-index holds
    base_figures: tuple = ()  # values shown as the base's, never in model-index
    load: str = "from_pretrained"  # in the load snippet
    names_base: bool = True
    text: tuple = ()  # more phrases the card must hold

    @property
    def id(self) -> str:
        return self.kind


def record(kind: str, config=None, metrics=None, **extra) -> dict:
    return results_record(kind, config or {}, metrics or {}, {"seconds": 1.0}, HUB_ID, **extra)


ROWS = [
    Row(
        "pruned",
        record("pruning", {"method": "sparsegpt", "sparsity": 0.5, "structure": "2:4"},
               {"dense": ppl(17.5), "pruned": ppl(31.25), "sparsity": 0.5},
               layers={"model.layers.0.mlp.down_proj": 0.5}),
        {"model": "smollm2-135m", "pruning": {"sparsegpt": {"sparsity": 0.5}}, "evaluation": EVAL},
        tag="sparsegpt", own=(("perplexity", 31.25),), base_figures=(17.5,),
        text=("(2:4; measured: 50.00%", "sparsity_masks.safetensors"),
    ),
    Row(
        "pruned",
        record("PruningCallback", {"method": "wanda", "sparsity": 0.5}, {}, global_step=4),
        {"callback": "PruningCallback", "pruning": {"wanda": {"sparsity": 0.5}},
         "model": "smollm2-135m"},
        tag="wanda", text=("PruningCallback", "saved at step 4", "Nothing was measured"),
    ),
    Row(
        "masked_lr_adapter",
        record("finetune", {}, {"eval_loss_before": 2.5, "eval_loss_after": 2.0,
                                "eval_ppl_after": 7.389},
               mask={"job": "golden", "density": 0.01}, trainable_parameters=1234),
        {"model": "smollm2-135m", "data": {"dataset": "alpaca"},
         "finetune": {"max_steps": 10, "eval_samples": 16}},
        peft_type="MASKED_LR", relation="adapter", library="peft", tag="masked-lr",
        own=(("loss", 2.0), ("perplexity", 7.389),), base_figures=(2.5,),
        load="PeftModel.from_pretrained", text=("1,234 trainable values", "golden"),
    ),
    Row(
        "finetuned_model",
        record("GoldenMaskCallback", {}, {}, global_step=3, masks={"density": 0.05}),
        {"callback": "GoldenMaskCallback", "golden": {"top_k_percent": 5}, "model": "smollm2-135m"},
        relation="finetune", tag="golden-parameters", text=("GoldenParamsTrainer",),
    ),
    Row(
        "merged_model",
        record("merging", {"method": "ties", "density": 0.2},
               {"base": ppl(17.5), "merged": ppl(19.0), "density": 0.2},
               merging={"method": "ties", "density": 0.2, "models": [
                   {"model": "/x/ft_a", "weight": 1.0, "density": 0.2}]}),
        {"base_model": "smollm2-135m", "merge_method": "ties", "evaluation": EVAL},
        relation="merge", tag="ties", own=(("perplexity", 19.0),), base_figures=(17.5,),
        text=("| ft_a | 1.0 | 0.2 |", "TIES"),
    ),
    Row(
        "merged_adapter",
        record("merging", {"method": "sparsegpt_tv", "density": 0.1},
               {"merged": ppl(18.0)}, merging={"method": "sparsegpt_tv", "models": []}),
        {"base_model": "smollm2-135m", "merge_method": "sparsegpt_tv", "evaluation": EVAL,
         "output": "adapter"},
        peft_type="MASKED_LR", relation="adapter", library="peft", tag="sparsegpt_tv",
        own=(("perplexity", 18.0),), load="PeftModel.from_pretrained", text=("OBS solver",),
    ),
    Row(
        "task_vector_adapter",
        record("TaskVectorPruneCallback", {"method": "sparsegpt_tv", "density": 0.1},
               {"mean_relative_output_error": 0.125}, global_step=6),
        {"callback": "TaskVectorPruneCallback", "task_vector_prune": {"density": 0.1},
         "model": "smollm2-135m"},
        peft_type="MASKED_LR", relation="adapter", library="peft", tag="task-vector",
        load="PeftModel.from_pretrained", text=("0.1250", "step 6"),
    ),
    Row(
        "task_vector_model",
        record("TaskVectorPruneCallback", {"method": "magnitude_prune", "density": 0.1},
               {"mean_relative_output_error": None}, global_step=6, applied_to_model=True),
        {"callback": "TaskVectorPruneCallback", "task_vector_prune": {"density": 0.1},
         "apply_to_model": True, "model": "smollm2-135m"},
        relation="finetune", tag="task-vector", text=("apply_to_model", "not measured"),
    ),
    Row(
        "basis_sharing_adapter",
        record("basis_sharing", {"ratio": 0.2, "group_size": 4, "shared_roles": ["down"]},
               {"dense": ppl(17.5), "compressed": ppl(24.0),
                "parameters": {"dense": 1000, "compressed": 800, "removed": 200}}),
        {"model": "smollm2-135m", "basis_sharing": {"ratio": 0.2}, "evaluation": EVAL},
        peft_type="BASIS_SHARING", relation="adapter", library="peft", tag="basis-sharing",
        own=(("perplexity", 24.0),), base_figures=(17.5,), load="PeftModel.from_pretrained",
        text=("parameters removed: 200 of 1,000 targeted parameters (20.00%)", "ICLR 2025"),
    ),
    Row(
        "basis_sharing_compressed",
        record("basis_sharing_compressed", {"ratio": 0.4, "group_size": 4},
               {"dense": ppl(17.5), "compressed": ppl(40.0)}),
        {"model": "smollm2-135m", "basis_sharing": {"ratio": 0.4}, "evaluation": EVAL},
        tag="basis-sharing", own=(("perplexity", 40.0),), base_figures=(17.5,),
        load="trust_remote_code=True", text=("without the dense base",),
    ),
    Row(
        "basis_sharing_compressed",
        record("basis_sharing", {"ratio": 0.2, "group_size": 4}, {"compressed": ppl(24.0)},
               output="compressed"),
        {"model": "smollm2-135m", "basis_sharing": {"ratio": 0.2}, "evaluation": EVAL,
         "output": "compressed"},
        tag="basis-sharing", own=(("perplexity", 24.0),), load="trust_remote_code=True",
    ),
    Row(
        "spd_adapter",
        record("spd", {"data": {"source": "wikitext2"}, "spd": {"num_components": 8}},
               {"kl": {"ci_masked": 0.5, "all_components": 0.01}},
               targets=["model.layers.0.mlp.down_proj"]),
        {"model": "smollm2-135m", "spd": {"C": 8}},
        peft_type="SPD", relation="adapter", library="peft", tag="spd",
        own=(("kl", 0.5), ("kl", 0.01)), load="PeftModel.from_pretrained",
        text=("`model.layers.0.mlp.down_proj`",),
    ),
    Row(
        "spd_toy",
        {**record("spd", {"toy_kind": "TMSConfig"}, {}), "base_model": None,
         "experiment": "tms_5-2", "summary": "5 features recovered"},
        {"spd": {"C": 20}}, library="peft", tag="toy-model", load="snapshot_download",
        names_base=False, text=("tms_5-2", "5 features recovered"),
    ),
    Row(
        "analysis_study",
        record("analysis", {"metric": "fisher", "top_k": 0.01, "eval_dataset": "wikitext2"},
               {"dense": ppl(17.5), "points": [{"kind": "zero", "strength": 1.0, "k": 10,
                                                "target": None, "top": 25.0}]}),
        {"model": "smollm2-135m", "analysis": {"metric": "fisher"}},
        library="hf-sparse", tag="critical-weights", base_figures=(17.5, 25.0),
        load="snapshot_download", names_base=False, text=("Not a model", "report.html"),
    ),
    Row(
        "masks",
        record("masks", {}, {"kept": 1000, "density": 0.01, "kl": 0.3}, job="golden"),
        {"model": "smollm2-135m", "data": {"dataset": "alpaca"}, "mask": {"golden": {}}},
        library="hf-sparse", tag="masks", base_figures=(0.3,), load="snapshot_download",
        names_base=False, text=("1,000 entries kept", "ParameterMasks.load"),
    ),
]  # fmt: skip


def test_the_table_covers_every_card_kind():
    assert {row.kind for row in ROWS} == set(CARD_KINDS)


def validate(card_text: str, row: Row) -> dict:
    """The checks every card passes; returns its metadata."""
    card = ModelCard(card_text)  # parses (raises on bad YAML / model-index)
    meta = card.data.to_dict()
    assert meta["library_name"] == row.library
    tags = meta["tags"]
    assert tags.count("hf-sparse") == 1 and "hf_sparse" not in tags and row.tag in tags
    if row.names_base:
        assert meta["base_model"] == HUB_ID
        assert "dequantized to float32 from a Q4_1 GGUF" in card_text
        assert "not the Hub's bf16 checkpoint" in card_text
        if card.data.eval_results:  # the figures are not presented as the Hub model's
            assert "(dequantized from a Q4_1 GGUF)" in card.data.model_name
    else:
        assert "base_model" not in meta  # a study or a mask file is not a derived model
    assert meta.get("base_model_relation") == row.relation
    index = {(r.metric_type, r.metric_value) for r in card.data.eval_results or []}
    assert index == set(row.own)
    for result in card.data.eval_results or []:
        assert result.dataset_type and result.dataset_split and result.dataset_name
        assert result.dataset_type in meta["datasets"]
    for value in row.base_figures:
        assert value not in {v for _, v in index}
        assert f"{value:.4f} | the base model" in card_text
    assert "pip install hf-sparse" in card_text and row.load in card_text
    if row.load == "PeftModel.from_pretrained":  # on the dequantized base it was made on
        assert "import hf_sparse" in card_text
        assert 'hf_sparse.fetch_model("smollm2-135m", install=True)' in card_text
    assert "[More Information Needed]" not in card_text
    assert REPO_ID_PLACEHOLDER in card_text
    for phrase in row.text:
        assert phrase in card_text, phrase
    return meta


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.kind}-{r.record['kind']}")
def test_every_kind_writes_a_valid_card_at_save_time(tmp_path, row):
    if row.peft_type:
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": row.peft_type}))
    write_outputs(tmp_path, row.record, row.recipe)  # what every pipeline and callback calls
    card_text = (tmp_path / "README.md").read_text()
    assert resolve_kind(row.record, row.peft_type, row.recipe) == row.kind
    validate(card_text, row)
    if row.recipe:  # the recipe is embedded
        assert next(iter(row.recipe)) + ":" in card_text
    pushed = with_repo_id(card_text, "me/out")
    assert REPO_ID_PLACEHOLDER not in pushed and '"me/out"' in pushed


def test_unknown_output_kind_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="no card for an output of kind 'weird'.*known kinds"):
        render_card({"kind": "weird"})


# ------------------------------------------------------------------ the PEFT save path


def converted_copy(tmp_path: Path) -> Path:
    """A folder shaped like ``hf-sparse fetch-model``'s converted copy (its marker file)."""
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"name": "smollm2-135m"}))
    return folder


def peft_models():
    from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
    from hf_sparse.masked_lr import MaskedLRConfig, get_masked_lr_model
    from hf_sparse.spd import SPDConfig, get_spd_model

    def masked_lr(model):
        weight = "model.layers.0.mlp.down_proj.weight"
        masks = {weight: dict(model.named_parameters())[weight] > 0}
        config = MaskedLRConfig(target_modules=["model.layers.0.mlp.down_proj"])
        return get_masked_lr_model(model, config, masks)

    def basis_sharing(model):
        config = BasisSharingConfig(ratio=0.2, group_size=2)
        return get_basis_sharing_model(model, config, make_token_windows(n=4, length=16))

    def spd(model):
        return get_spd_model(model, SPDConfig(C=2, target_modules=["model.layers.0.mlp.up_proj"]))

    return {"MASKED_LR": masked_lr, "BASIS_SHARING": basis_sharing, "SPD": spd}


@pytest.mark.parametrize("peft_type", ["MASKED_LR", "BASIS_SHARING", "SPD"])
def test_our_adapters_save_pretrained_writes_our_card_not_peft_stock(tmp_path, peft_type):
    model = build_tiny_model("llama")
    model.name_or_path = str(converted_copy(tmp_path))  # loaded from the converted copy
    adapted = peft_models()[peft_type](model)
    adapted.save_pretrained(tmp_path / "out")
    card_text = (tmp_path / "out" / "README.md").read_text()
    meta = card_metadata(card_text)
    ModelCard(card_text)
    assert "[More Information Needed]" not in card_text
    assert meta["base_model"] == HUB_ID and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["tags"].count("hf-sparse") == 1
    assert f"registers {peft_type} with peft" in card_text
    assert "dequantized to float32 from a Q4_1 GGUF" in card_text
    assert str(tmp_path) not in card_text  # no local path in the card


def test_results_written_after_the_adapter_complete_its_card(tmp_path):
    model = build_tiny_model("llama")
    adapted = peft_models()["SPD"](model)
    adapted.save_pretrained(tmp_path)
    before = (tmp_path / "README.md").read_text()
    row = next(r for r in ROWS if r.kind == "spd_adapter")
    write_outputs(tmp_path, row.record, row.recipe)
    after = (tmp_path / "README.md").read_text()
    assert "Nothing was measured" in before and "KL from the target, ci_masked" in after
    validate(after, row)


def test_other_adapters_keep_peft_card(tmp_path):
    model = build_tiny_model("llama")
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    card_text = (tmp_path / "README.md").read_text()
    assert "hf-sparse" not in card_metadata(card_text).get("tags", [])


# ------------------------------------------------------------------ base and datasets


def test_base_provenance_from_name_converted_copy_local_folder_and_hub_id(tmp_path):
    for source in ("smollm2-135m", converted_copy(tmp_path)):
        info = describe_base(source)
        assert info.hub_id == HUB_ID and info.dequantized_from == "Q4_1 GGUF"
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert describe_base(plain).hub_id is None  # a local folder has no Hub id
    assert describe_base("org/other").hub_id == "org/other"
    assert "dequantized" not in describe_base("org/other").provenance
    assert describe_base(None, "tiny").hub_id is None
    # the live model's source (the converted copy) wins over a recorded Hub id
    assert describe_base(tmp_path / "converted", HUB_ID).dequantized_from == "Q4_1 GGUF"


def test_dataset_refs_name_hub_sets_and_splits():
    wiki = dataset_ref("wikitext2")
    assert (wiki.hub_id, wiki.config, wiki.split) == ("Salesforce/wikitext", "wikitext-2-raw-v1",
                                                      "test")  # fmt: skip
    assert dataset_ref("some/hub-set").hub_id == "some/hub-set"
    assert dataset_ref("/data/file.jsonl").hub_id is None
    assert dataset_ref(None) is None


def test_write_card_reads_what_the_folder_holds(tmp_path):
    row = ROWS[0]
    write_outputs(tmp_path, row.record, row.recipe, card=False)
    assert not (tmp_path / "README.md").exists()
    write_card(tmp_path)
    validate((tmp_path / "README.md").read_text(), row)


def test_an_adapter_in_a_subfolder_is_loaded_from_it(tmp_path):
    """The SPD recipe saves its adapter under adapter/: the card's snippet says so."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "SPD"}))
    row = next(r for r in ROWS if r.kind == "spd_adapter")
    write_outputs(tmp_path, row.record, row.recipe)
    card_text = (tmp_path / "README.md").read_text()
    assert (
        f'PeftModel.from_pretrained(base, "{REPO_ID_PLACEHOLDER}", subfolder="adapter")'
        in card_text
    )


@pytest.mark.real_model
def test_an_adapter_card_snippet_loads_the_adapter_on_the_real_model(tmp_path):
    """SmolLM2-135M (our dequantized copy): the load code of a saved adapter's card, with the
    repo id replaced by the folder, runs and gives the saved adapter."""
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from hf_sparse.masked_lr import MaskedLRConfig, get_masked_lr_model
    from hf_sparse.real_model import fetch_model

    base = AutoModelForCausalLM.from_pretrained(fetch_model("smollm2-135m"))
    name = "model.layers.0.mlp.down_proj"
    weight = dict(base.named_parameters())[f"{name}.weight"]
    masks = {f"{name}.weight": torch.rand(weight.shape, generator=torch.Generator()) < 0.01}
    get_masked_lr_model(base, MaskedLRConfig(target_modules=[name]), masks).save_pretrained(
        tmp_path
    )
    card_text = with_repo_id((tmp_path / "README.md").read_text(), str(tmp_path))
    assert card_metadata(card_text)["base_model"] == HUB_ID
    code = re.search(r"```python\n(.*?)```", card_text, re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)
    loaded = namespace["model"]
    assert loaded.peft_config["default"].peft_type == "MASKED_LR"
