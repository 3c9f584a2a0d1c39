"""SPD on SmolLM2-135M: decompose two linears briefly, save, reload, ablate (skips without the
cached model)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hf_sparse.real_model import cache_root
from hf_sparse.spd.pipeline import load_experiment

pytestmark = pytest.mark.real_model


def test_smollm2_save_reload_ablate_round_trip(tmp_path):
    if not (cache_root() / "models" / "smollm2-135m" / "model.safetensors").exists():
        pytest.skip("SmolLM2-135M is not cached (hf-sparse fetch-model smollm2-135m)")
    from hf_sparse.spd.lm import run_lm_decomposition

    experiment = load_experiment("recipes/spd-smollm2.yaml").experiment
    experiment.spd["C"] = 8
    experiment.train.steps, experiment.train.batch_size, experiment.train.logging_steps = 2, 2, 1
    experiment.loss.faithfulness_warmup_steps = 20
    experiment.data.count, experiment.data.length, experiment.data.eval_count = 4, 16, 2
    out = tmp_path / "spd-smollm2"
    results = run_lm_decomposition(experiment, out)
    trip = results["round_trip"]
    assert trip["reload_max_abs_logit_diff"] == 0.0
    assert trip["kl_all_components_plus_delta"] == pytest.approx(0.0, abs=1e-4)
    assert trip["kl_ablated_by_importance"] >= 0.0
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {tuple(v.shape) for k, v in saved.items() if k.endswith("spd_U")} == {
        (1536, 8),
        (576, 8),
    }
    kl = results["metrics"]["kl"]
    assert kl["no_components"] > kl["all_components_plus_delta"]
    assert results["metrics"]["mean_active_per_token"] >= 0
    assert results["torch_threads"] == torch.get_num_threads()  # recorded as it ran
