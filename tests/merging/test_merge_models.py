"""merge_ on tiny models: data-free methods tensor by tensor, SparseGPT-TV against a manual
block-by-block reference (sequential and not, per-task and shared Hessians), bad input."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.calibration import StatsCollector
from hf_sparse.merging import MergeConfig, MergeSource, merge_, merge_task_vectors
from hf_sparse.merging.core import ObsOptions, prune_task_vector_obs
from hf_sparse.merging.task_vectors import inspect_source, load_task_vector
from hf_sparse.models import target_linears
from tests.conftest import build_tiny_model, make_token_windows


def _task_vectors(base, folders):
    return [load_task_vector(base, inspect_source(f)) for f in folders]


@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude_prune", "ties", "dare_ties"])
def test_data_free_merge_equals_the_tensor_rule_on_every_changed_tensor(saved_family, method):
    base, base_dir, folders = saved_family("llama", 3)
    vectors = _task_vectors(base, folders)
    weights = [0.5, 1.0, 0.8]
    sources = [MergeSource(str(f), w) for f, w in zip(folders, weights, strict=True)]
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    result = merge_(base, MergeConfig(method, density=0.3, seed=3), sources, show_progress=False)
    generator = torch.Generator().manual_seed(3)
    for name in sorted(vectors[0]):
        expected = merge_task_vectors(
            [v[name] for v in vectors], weights, method, 0.3, generator=generator
        )
        torch.testing.assert_close(result.deltas[name], expected, rtol=0, atol=0)
        merged = dict(base.named_parameters())[name]
        torch.testing.assert_close(merged, original[name] + expected, rtol=1e-6, atol=1e-7)
    assert base.config.merging["method"] == method
    untouched = [n for n in original if n not in result.deltas]
    assert untouched and all(
        torch.equal(dict(base.named_parameters())[n], original[n]) for n in untouched
    )


def _hessians(model, windows, linears):
    with StatsCollector(linears, need_xtx=True, need_sq_norms=False) as collector, torch.no_grad():
        model(input_ids=windows)
    return {n: collector.stats[n].hessian for n in linears}


def _manual_sparsegpt_tv(base, vectors, windows, density, sequential, per_task):
    """Reference: block by block, Hessians measured on the model as it stands (merged earlier
    blocks when sequential, the base otherwise), each task pruned linear by linear."""
    model = build_tiny_model("llama")
    model.load_state_dict(base.state_dict())
    grouped = target_linears(model)
    params = dict(model.named_parameters())
    merged_deltas = {}
    for linears in grouped.values():
        streams = windows if per_task else [torch.cat(windows)]
        hessians = [_hessians(model, w, linears) for w in streams]
        for name in linears:
            key = f"{name}.weight"
            pruned = [
                prune_task_vector_obs(
                    v[key], hessians[i if per_task else 0][name], density, ObsOptions()
                )
                for i, v in enumerate(vectors)
            ]
            merged_deltas[key] = torch.stack(pruned).sum(0)
        if sequential:
            with torch.no_grad():
                for name in linears:
                    params[f"{name}.weight"] += merged_deltas[f"{name}.weight"]
    return merged_deltas


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("per_task", [True, False])
def test_sparsegpt_tv_equals_a_manual_block_by_block_reference(saved_family, sequential, per_task):
    base, _, folders = saved_family("llama", 2)
    vectors = _task_vectors(base, folders)
    windows = [make_token_windows(n=4, length=16, seed=s) for s in (1, 2)]
    expected = _manual_sparsegpt_tv(base, vectors, windows, 0.3, sequential, per_task)
    config = MergeConfig(
        "sparsegpt_tv",
        density=0.3,
        sequential=sequential,
        hessians="per_task" if per_task else "shared",
    )
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    result = merge_(base, config, folders, calibration=windows, show_progress=False)
    assert sorted(result.deltas) == sorted(expected)
    merged = dict(base.named_parameters())
    for name, param in merged.items():  # the model holds base + merged task vector
        expected_weight = original[name] + result.deltas.get(name, 0)
        torch.testing.assert_close(param.detach(), expected_weight, rtol=0, atol=1e-6)
    for name, delta in expected.items():
        torch.testing.assert_close(result.deltas[name], delta, rtol=1e-4, atol=1e-5)
    # every linear of every task got a relative reconstruction error in (0, 1)
    assert len(result.layer_errors) == len(expected) and all(
        len(e) == 2 and min(e) > 0 and max(e) < 1 for e in result.layer_errors.values()
    )


def test_sequential_and_per_task_hessians_change_the_result(saved_family):
    base, _, folders = saved_family("llama", 2)
    windows = [make_token_windows(n=4, length=16, seed=s) for s in (1, 2)]

    def run(**settings):
        model = build_tiny_model("llama")
        model.load_state_dict(base.state_dict())
        config = MergeConfig("sparsegpt_tv", density=0.3, **settings)
        return merge_(model, config, folders, calibration=windows, show_progress=False).deltas

    seq, nonseq = run(sequential=True), run(sequential=False)
    first_block = [n for n in seq if ".layers.0." in n]
    last_block = [n for n in seq if ".layers.1." in n]
    assert all(torch.equal(seq[n], nonseq[n]) for n in first_block)  # same base inputs
    assert any(not torch.allclose(seq[n], nonseq[n]) for n in last_block)
    shared = run(hessians="shared")
    assert any(not torch.allclose(seq[n], shared[n]) for n in first_block)


def test_gpt2_conv1d_sparsegpt_tv_merges_in_the_stored_layout(saved_family):
    base, _, folders = saved_family("gpt2", 2)
    windows = make_token_windows(n=4, length=16, seed=1)
    shapes = {n: p.shape for n, p in base.named_parameters()}
    result = merge_(
        base,
        MergeConfig("sparsegpt_ties", density=0.5),
        folders,
        calibration=windows,
        show_progress=False,
    )
    assert result.deltas and all(d.shape == shapes[n] for n, d in result.deltas.items())
    # two task vectors at density 0.5 with independent supports cover about 1 - 0.5^2
    assert result.density == pytest.approx(0.75, abs=0.05)


def test_in_memory_task_vectors_and_adapter_sources_merge(saved_family):
    base, _, folders = saved_family("llama", 2)
    vectors = _task_vectors(base, folders)
    model = build_tiny_model("llama")
    a = merge_(model, MergeConfig("ties", density=0.5), vectors, show_progress=False)
    b = merge_(build_tiny_model("llama"), MergeConfig("ties", density=0.5), folders)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in b.deltas)


def test_bad_input_fails_before_the_base_changes(saved_family, tmp_path):
    base, _, folders = saved_family("llama", 2)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        MergeConfig("ties", density=1.5)
    with pytest.raises(ValueError, match="density must be in"):
        MergeSource(str(folders[0]), density=0.0)
    with pytest.raises(ValueError, match="unknown merge method 'tie'"):
        MergeConfig("tie")
    with pytest.raises(ValueError, match="3 weights for 2 models"):
        merge_(base, MergeConfig("ties"), folders, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="needs calibration data"):
        merge_(base, MergeConfig("sparsegpt_tv", density=0.5), folders)
    with pytest.raises(ValueError, match="3 calibration sets for 2 models"):
        merge_(
            base,
            MergeConfig("sparsegpt_tv", density=0.5),
            folders,
            calibration=[make_token_windows()] * 3,
        )
    build_tiny_model("llama", vocab_size=96).save_pretrained(tmp_path / "other-vocab")
    with pytest.raises(ValueError, match="vocab_size"):
        merge_(base, MergeConfig("ties"), [folders[0], tmp_path / "other-vocab"])
    after = dict(base.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsegpt_tv_with_owl_keeps_each_task_density_exact(saved_family, arch):
    base, _, folders = saved_family(arch, 2)
    windows = make_token_windows(n=4, length=16)
    config = MergeConfig("sparsegpt_tv", density=0.3, sparsity_profile="owl", owl_m=2,
                         owl_lambda=0.1)  # fmt: skip
    result = merge_(base, config, [str(f) for f in folders], calibration=windows,
                    weights=[1.0, 0.0], show_progress=False)  # fmt: skip
    # weight 0 for the second task: the merged delta of a targeted layer is task 1's pruned one
    linears = {n for g in target_linears(base).values() for n in g}
    kept = [result.deltas[f"{n}.weight"] for n in sorted(linears)]
    total = sum(d.numel() for d in kept)
    assert sum(int((d != 0).sum()) for d in kept) == total - round(0.7 * total)
    per_layer = {round(float((d != 0).float().mean()), 6) for d in kept}
    assert len(per_layer) > 1  # OWL gave the blocks different densities
    assert base.config.merging["sparsity_profile"] == "owl"
    uniform = MergeConfig("sparsegpt_tv", density=0.3)
    assert uniform.sparsity_profile == "uniform"
    with pytest.raises(ValueError, match="OBS method"):
        MergeConfig("ties", density=0.3, sparsity_profile="owl")


@pytest.mark.parametrize(
    "settings",
    [{"method": "dare_sparsegpt"}, {"method": "sparsegpt_tv", "dare_rescale": True}],
)
def test_dare_sparsegpt_merge_is_the_sparsegpt_merge_divided_by_the_density(saved_family, settings):
    base, _, folders = saved_family("llama", 2)
    windows = [make_token_windows(n=4, length=16, seed=s) for s in (1, 2)]

    def run(**config):
        model = build_tiny_model("llama")
        model.load_state_dict(base.state_dict())
        config = MergeConfig(density=0.3, sequential=False, **config)
        return merge_(model, config, folders, calibration=windows, show_progress=False)

    plain, dare = run(method="sparsegpt_tv"), run(**settings)
    assert sorted(dare.deltas) == sorted(plain.deltas)
    for name, delta in dare.deltas.items():  # OBS-solved linears and magnitude-trimmed others
        torch.testing.assert_close(delta, plain.deltas[name] / 0.3, rtol=1e-5, atol=1e-6)
    assert dare.model.config.merging["method"] == settings["method"]
