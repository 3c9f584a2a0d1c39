"""The SmolLM2 block-MLP decomposition recipes (first 3 and 5 blocks): they parse, and their
target pattern picks exactly gate/up/down of those blocks on any llama-style model."""

from __future__ import annotations

import pytest

from hf_sparse.spd import SPDConfig
from hf_sparse.spd.lm import LMExperiment
from hf_sparse.spd.model import check_targets
from hf_sparse.spd.pipeline import load_experiment


@pytest.mark.parametrize("blocks", [3, 5])
def test_block_mlp_recipes_target_the_first_blocks(tiny_model, blocks):
    recipe = load_experiment(f"recipes/spd-smollm2-{blocks}layer.yaml")
    experiment = recipe.experiment
    assert isinstance(experiment, LMExperiment)
    assert experiment.name == f"smollm2-{blocks}layer"
    assert recipe.output_dir == f"outputs/spd-smollm2-{blocks}layer"
    assert experiment.loss.output_loss == "kl"
    model = tiny_model("llama", num_hidden_layers=6)
    names = check_targets(model, SPDConfig(**experiment.spd))
    expected = {
        f"model.layers.{i}.mlp.{proj}_proj"
        for i in range(blocks)
        for proj in ("gate", "up", "down")
    }
    assert set(names) == expected


def test_a_C_below_the_targets_rank_is_logged(tiny_model, caplog):
    from hf_sparse.spd.lm import _warn_below_rank

    model = tiny_model("llama", num_hidden_layers=2)
    up = model.model.layers[0].mlp.up_proj.weight
    rank = min(up.shape)
    pattern = r"model\.layers\.0\.mlp\.(gate|up|down)_proj"
    for C, expected in ((rank - 1, 3), (rank, 0)):
        config = SPDConfig(C=C, target_modules=pattern)
        with caplog.at_level("WARNING", logger="hf_sparse.spd.lm"):
            caplog.clear()
            short = _warn_below_rank(model, config, check_targets(model, config))
        assert len(short) == expected
        assert (f"raise spd.C to {rank}" in caplog.text) == bool(expected)
