"""Every folder a weight-changing callback's model is saved into is a shippable artifact.

Tiny Trainer runs (CPU, a few steps): each checkpoint and the final ``trainer.save_model()``
folder (the default one and another) hold the callback's masks, the ``sparsity`` block (pruning)
and a card that parses with ``huggingface_hub.ModelCard``, with results and recipe files.
"""

from __future__ import annotations

import copy
import json

import torch
from hf_sparse.callbacks import BasisSharingCallback, GoldenMaskCallback, PruningCallback
from hf_sparse.callbacks.masked_lr import GOLDEN_MASKS_FILE
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import Trainer

from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from hf_sparse.cards import card_metadata
from hf_sparse.masked_lr import GoldenConfig, GoldenParamsTrainer
from hf_sparse.masks import ParameterMasks, load_masks
from hf_sparse.masks.bitmask import MASKS_FILE
from hf_sparse.outputs import RECIPE_FILE, read_results
from hf_sparse.pruning import WandaConfig
from tests.conftest import build_tiny_model, make_token_windows, tiny_training_args


def examples(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w, "labels": w.clone()} for w in make_token_windows(n=n, length=length)]


def check_card(folder, kind: str, tag: str) -> dict:
    text = (folder / "README.md").read_text()
    ModelCard(text)  # parses
    meta = card_metadata(text)
    assert meta["tags"].count("hf-sparse") == 1 and tag in meta["tags"]
    assert kind in text
    assert read_results(folder)["kind"] == kind and (folder / RECIPE_FILE).is_file()
    return meta


def test_pruning_callback_writes_mask_sparsity_block_and_card_everywhere(tmp_path):
    callback = PruningCallback(WandaConfig(sparsity=0.5), num_calibration_batches=1)
    args = tiny_training_args(tmp_path / "run", save_strategy="steps", save_steps=2, max_steps=2)
    model = build_tiny_model("llama")
    trainer = Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback])
    trainer.train()
    trainer.save_model()  # the default folder: args.output_dir
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run", tmp_path / "final"):
        saved = load_masks(folder / MASKS_FILE)
        assert saved.keys() == callback.masks.keys()
        assert all(torch.equal(saved[n], callback.masks[n]) for n in saved)
        block = json.loads((folder / "config.json").read_text())["sparsity"]
        assert block["method"] == "wanda" and block["measured_sparsity"] > 0.49
        check_card(folder, "PruningCallback", "wanda")
        assert read_results(folder)["metrics"]["sparsity"] > 0.49
    assert {"hf-sparse", "pruned", "wanda"} <= set(trainer.model.model_tags)  # Trainer's card
    # a copy of the model saves itself, not the original
    twin = copy.deepcopy(trainer.model)
    with torch.no_grad():
        twin.lm_head.weight.add_(1.0)
    twin.save_pretrained(tmp_path / "twin")
    state = load_file(tmp_path / "twin" / "model.safetensors")
    key = next(
        k for k in state if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight")
    )
    assert not torch.equal(state[key], trainer.model.state_dict()[key])
    assert (tmp_path / "twin" / MASKS_FILE).is_file()


def test_golden_mask_callback_writes_masks_and_card_into_the_final_folder(tmp_path):
    callback = GoldenMaskCallback(GoldenConfig(top_k_percent=40, num_samples=4, params=["up"]))
    args = tiny_training_args(tmp_path, max_steps=1)
    trainer = GoldenParamsTrainer(
        model=build_tiny_model("llama"), args=args, train_dataset=examples(), callbacks=[callback]
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert ParameterMasks.load(tmp_path / "final" / GOLDEN_MASKS_FILE) == callback.masks
    check_card(tmp_path / "final", "GoldenMaskCallback", "golden-parameters")
    assert read_results(tmp_path / "final")["masks"]["density"] == callback.masks.density()


def test_basis_sharing_callback_adapter_folders_get_counts_and_card(tmp_path):
    base = build_tiny_model("llama")
    model = get_basis_sharing_model(base, BasisSharingConfig(ratio=0.2, group_size=2), defer=True)
    callback = BasisSharingCallback(num_batches=1)
    args = tiny_training_args(tmp_path, max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    folder = tmp_path / "final"
    assert (folder / "adapter_model.safetensors").is_file()
    meta = check_card(folder, "BasisSharingCallback", "basis-sharing")
    assert meta["library_name"] == "peft"
    assert read_results(folder)["metrics"]["parameters"]["removed"] > 0


def test_every_callback_has_a_docstring_and_its_module_a_lifecycle():
    import inspect

    import hf_sparse.callbacks as callbacks

    for name in callbacks.__all__:
        cls = getattr(callbacks, name)
        assert len(inspect.getdoc(cls) or "") > 60, f"{name} has no real docstring"
        module_doc = inspect.getmodule(cls).__doc__ or ""
        assert "Example::" in module_doc and "on_train_begin" in module_doc, name


def test_trainer_finds_the_callback_masks_and_its_tokenizer_for_generations(tmp_path):
    """README: GoldenParamsTrainer + GoldenMaskCallback, then compare_generations_with_mask
    with no masks given: the callback's masks and the processing_class are used."""
    from tests.conftest import build_word_tokenizer

    tokenizer = build_word_tokenizer("a b c d e f g h")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    callback = GoldenMaskCallback(GoldenConfig(top_k_percent=40, num_samples=4, params=["up"]))
    trainer = GoldenParamsTrainer(
        model=build_tiny_model("llama"),
        args=tiny_training_args(tmp_path, max_steps=1),
        train_dataset=examples(),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.current_masks() is callback.masks
    rows = trainer.compare_generations_with_mask(["a b c"], max_new_tokens=3)
    assert rows[0]["prompt"] == "a b c" and isinstance(rows[0]["masked"], str)


def test_task_vector_callback_applied_to_the_model_gives_its_saves_a_card(tmp_path):
    from hf_sparse.callbacks import TaskVectorPruneCallback

    from hf_sparse.merging import TaskVectorPruneConfig

    config = TaskVectorPruneConfig(method="magnitude_prune", density=0.5)
    callback = TaskVectorPruneCallback(config, apply_to_model=True)
    args = tiny_training_args(tmp_path, max_steps=1)
    model = build_tiny_model("llama")
    trainer = Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    meta = check_card(tmp_path / "final", "TaskVectorPruneCallback", "task-vector")
    assert meta["library_name"] == "transformers"  # the model itself, not the adapter
    assert "apply_to_model" in (tmp_path / "final" / "README.md").read_text()
    adapter_card = (callback.saved_to / "README.md").read_text()
    assert card_metadata(adapter_card)["library_name"] == "peft"


def test_recovery_inside_the_pruning_pipeline_leaves_no_save_writer():
    from hf_sparse.callbacks.saving import add_save_writer, remove_save_writers

    model = build_tiny_model("llama")
    add_save_writer(model, "x", lambda folder, m: None)
    assert "save_pretrained" in model.__dict__
    remove_save_writers(model)
    assert "save_pretrained" not in model.__dict__ and not hasattr(model, "_hf_sparse_save_writers")
