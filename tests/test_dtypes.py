"""Half-precision models (bf16, fp16): statistics and solves in fp32 (fp64 when asked), weights
written back in the model's dtype, results close to the same method run in fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model, make_token_windows

import hf_sparse  # noqa: F401  (registers BASIS_SHARING)
from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from hf_sparse.importance import compute_importance
from hf_sparse.merging import MergeConfig, merge_
from hf_sparse.models import target_linears, weight_matrix
from hf_sparse.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_
from hf_sparse.pruning import apply as pruning_apply

WINDOWS = make_token_windows(VOCAB, 4, 16, seed=3)
HALF = [torch.bfloat16, torch.float16]
FAMILIES = ["llama", "gpt2"]  # Linear and GPT-2's transposed Conv1D
PRUNERS = {"sparsegpt": SparseGPTConfig, "wanda": WandaConfig, "magnitude": MagnitudeConfig}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: statistics on one thread


def model_in(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    """The seeded tiny model with its weights rounded to ``dtype``, in ``dtype``."""
    return build_tiny_model(arch, seed=0).to(dtype).eval()


def upcast(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    """The same rounded weights held in fp32: the reference run."""
    return model_in(arch, dtype).float()


def masks_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(v.numel() for v in a.values())


def loss(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(model(input_ids=WINDOWS, labels=WINDOWS).loss)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", list(PRUNERS))
def test_prune_half_keeps_dtype_with_fp32_statistics(arch, dtype, method, monkeypatch):
    seen: list[torch.dtype] = []
    original_obs, original_select = pruning_apply.obs_prune, pruning_apply.select_mask

    def spy_obs(target, hessian, *args, **kwargs):
        seen.extend([target.dtype, hessian.dtype])
        return original_obs(target, hessian, *args, **kwargs)

    def spy_select(config, weight, sq_norms, *args, **kwargs):
        seen.append(sq_norms.dtype if sq_norms is not None else torch.float32)
        return original_select(config, weight, sq_norms, *args, **kwargs)

    monkeypatch.setattr(pruning_apply, "obs_prune", spy_obs)
    monkeypatch.setattr(pruning_apply, "select_mask", spy_select)
    model = model_in(arch, dtype)
    linears = {n: m for group in target_linears(model).values() for n, m in group.items()}
    before = {name: weight_matrix(module).clone() for name, module in linears.items()}
    result = prune_(
        model, PRUNERS[method](sparsity=0.5), WINDOWS, batch_size=2, show_progress=False
    )
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert result.measured_sparsity == pytest.approx(0.5, abs=0.01)
    if method != "magnitude":
        assert seen and set(seen) == {torch.float32}, seen
    reference = upcast(arch, dtype)
    config = PRUNERS[method](sparsity=0.5)
    expected = prune_(reference, config, WINDOWS, batch_size=2, show_progress=False)
    # activations differ in the last half-precision bits only: near-ties may flip, no more
    assert masks_agreement(result.masks, expected.masks) > (0.999 if method == "magnitude" else 0.9)
    for name, keep in result.masks.items():
        weight = weight_matrix(dict(model.named_modules())[name])
        assert torch.count_nonzero(weight[~keep]) == 0, name
        if method != "sparsegpt":  # mask-only methods leave kept weights bit-identical
            assert torch.equal(weight[keep], before[name][keep]), name
    assert loss(model) == pytest.approx(loss(reference), rel=0.05)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_float64_when_asked(method, monkeypatch):
    seen: list[torch.dtype] = []
    original_obs, original_select = pruning_apply.obs_prune, pruning_apply.select_mask

    def spy_obs(target, hessian, *args, **kwargs):
        seen.extend([target.dtype, hessian.dtype, kwargs["dtype"]])
        return original_obs(target, hessian, *args, **kwargs)

    def spy_select(config, weight, sq_norms, *args, **kwargs):
        seen.append(sq_norms.dtype)
        return original_select(config, weight, sq_norms, *args, **kwargs)

    monkeypatch.setattr(pruning_apply, "obs_prune", spy_obs)
    monkeypatch.setattr(pruning_apply, "select_mask", spy_select)
    model = model_in("llama", torch.bfloat16)
    config = PRUNERS[method](sparsity=0.5, compute_dtype="float64")
    wide = prune_(model, config, WINDOWS, batch_size=2, show_progress=False)
    assert seen and set(seen) == {torch.float64}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    narrow = prune_(model_in("llama", torch.bfloat16), PRUNERS[method](sparsity=0.5), WINDOWS,
                    batch_size=2, show_progress=False)  # fmt: skip
    assert masks_agreement(wide.masks, narrow.masks) > 0.99


def test_compute_dtype_is_checked():
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        SparseGPTConfig(sparsity=0.5, compute_dtype="float16")
    with pytest.raises(ValueError, match="reduction must be one of"):
        WandaConfig(sparsity=0.5, reduction="mean")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", FAMILIES)
def test_importance_of_half_model_is_fp32_and_close(arch, dtype):
    for metric in ("wanda", "obs", "fisher"):
        scores = compute_importance(model_in(arch, dtype), WINDOWS[:2], metric=metric,
                                    show_progress=False)  # fmt: skip
        expected = compute_importance(upcast(arch, dtype), WINDOWS[:2], metric=metric,
                                      show_progress=False)  # fmt: skip
        assert scores.keys() == expected.keys()
        for name, value in scores.items():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), (metric, name)
            scale = float(expected[name].abs().max())
            torch.testing.assert_close(value, expected[name], rtol=0.1, atol=0.1 * scale)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", FAMILIES)
def test_basis_sharing_of_half_model(arch, dtype):
    config = BasisSharingConfig(ratio=0.2, group_size=2)
    compressed = get_basis_sharing_model(model_in(arch, dtype), config, calibration=WINDOWS,
                                         batch_size=2)  # fmt: skip
    reference = get_basis_sharing_model(upcast(arch, dtype), config, calibration=WINDOWS,
                                        batch_size=2)  # fmt: skip
    base_dtypes = {p.dtype for n, p in compressed.named_parameters() if "basis_sharing" not in n}
    assert base_dtypes == {dtype}
    with torch.no_grad():
        logits = compressed(input_ids=WINDOWS).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert loss(compressed) == pytest.approx(loss(reference), rel=0.05)


def _task_vectors(model: torch.nn.Module, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    names = [f"{n}.weight" for g in target_linears(model).values() for n in g]
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(7)
    return [
        {n: (torch.randn(params[n].shape, generator=generator) * 0.02).to(dtype) for n in names}
        for _ in range(2)
    ]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", ["ties", "sparsegpt_tv"])
def test_merge_into_half_model(arch, dtype, method):
    model = model_in(arch, dtype)
    vectors = _task_vectors(model, dtype)
    calibration = WINDOWS if method == "sparsegpt_tv" else None
    config = MergeConfig(method, density=0.3)
    merge_(model, config, vectors, calibration=calibration, batch_size=2, show_progress=False)
    reference = upcast(arch, dtype)
    merge_(reference, config, vectors, calibration=calibration, batch_size=2, show_progress=False)
    assert {p.dtype for p in model.parameters()} == {dtype}
    merged, expected = dict(model.named_parameters()), dict(reference.named_parameters())
    changed = outside = total = 0
    eps = torch.finfo(dtype).eps
    for name in vectors[0]:
        # the fp32 result rounded to the model's dtype, up to a few half-precision steps; with
        # activations (sparsegpt_tv) a few near-tied OBS choices may flip
        value, reference_value = merged[name].detach().float(), expected[name].detach()
        scale = float(reference_value.abs().max())
        close = torch.isclose(value, reference_value, rtol=8 * eps, atol=8 * eps * scale)
        outside += int((~close).sum())
        total += value.numel()
        changed += int((merged[name] != model_in(arch, dtype).get_parameter(name)).sum())
    assert outside <= (0.01 * total if method == "sparsegpt_tv" else 0), outside
    assert changed > 0
