"""The PEFT contract: one table of cases, one set of tests (peft's ``testing_common`` shape).

Every hf_sparse PEFT method runs on tiny random llama, qwen2, opt and gpt2 (``Conv1D``) models
through the same tests: the disabled adapter is the base model; only the adapter trains; save ->
reload (in this process and in a fresh one) gives the same logits; ``merge_and_unload`` gives a
plain transformers model with the adapted logits; the adapter file holds no base weight; two
adapters on one model follow the active one; ``add_weighted_adapter`` is refused clearly.

A new method gets the whole contract by adding a ``Method`` (how to build it on a tiny model,
which parameters it trains, how to nudge them so the adapter is not a no-op, what it refuses)
and its rows in ``CASES``. Where a method cannot keep a promise it says so in its ``Method``
with the error it raises, and the test asserts that error instead.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from hf_sparse.masked_lr import MaskedLRConfig, get_masked_lr_model
from hf_sparse.models import target_linears, weight_matrix
from hf_sparse.spd import SPDConfig, get_spd_model
from tests.conftest import build_tiny_model, make_token_windows

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("llama", "qwen2", "opt", "gpt2")  # gpt2: transformers' Conv1D, weights stored [in, out]
IDS = make_token_windows(n=2, length=12, seed=3)
ADAPTER_FILE = "adapter_model.safetensors"
# Reloading reads back the very tensors that were saved: the logits agree to float rounding of
# a different thread split at most. Merging re-associates the matmuls (W + delta, C @ B).
RELOADED = {"rtol": 0.0, "atol": 1e-6}
MERGED = {"rtol": 1e-5, "atol": 1e-5}


# ------------------------------------------------------------------------ the tiny models


@functools.cache
def dense_linears(arch: str) -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, d_in)}`` of the decoder-block linears of the tiny ``arch``."""
    groups = target_linears(build_tiny_model(arch))
    return {
        name: tuple(weight_matrix(module).shape)
        for group in groups.values()
        for name, module in group.items()
    }


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trainable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def noise(std: float, relative: bool) -> Callable[[nn.Module, int], None]:
    """A nudge: seeded Gaussian noise on every trainable parameter, of ``std`` (``relative``:
    times the parameter's RMS), so that a round trip is checked on values no init gives."""

    def nudge(model: nn.Module, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    scale = std * float(param.pow(2).mean().sqrt()) if relative else std
                    param.add_(scale * torch.randn(param.shape, generator=generator))

    return nudge


# ------------------------------------------------------------------------ the methods


@dataclass(frozen=True)
class Method:
    """What the contract needs to know about one PEFT method."""

    peft_type: str
    prefix: str  # every adapter tensor's name carries it (peft's rule)
    # (model or PeftModel, case, adapter name, seed) -> the PeftModel with that adapter added;
    # the seed picks the method's own random choices (masks, initial components)
    adapt: Callable[[nn.Module, Case, str, int], PeftModel]
    # (case, the adapter's config, adapter name, seed) -> {parameter name: shape} of what
    # trains, worked out from the config, the seed's choices and the base shapes alone
    expected_trainable: Callable[[Case, object, str, int], dict[str, tuple[int, ...]]]
    nudge: Callable[[nn.Module, int], None]
    weighted_error: str  # what add_weighted_adapter's NotImplementedError says
    # options -> whether the adapter file is smaller than the weights it adapts
    small_file: Callable[[dict], bool]
    disable_error: str | None = None  # None: disable_adapter() gives the base model
    add_error: str | None = None  # None: a second adapter can be added in memory


@dataclass(frozen=True)
class Case:
    method: Method
    arch: str
    options: dict = field(default_factory=dict)  # config fields of this row
    label: str = ""

    @property
    def id(self) -> str:
        return "-".join(filter(None, (self.method.peft_type.lower(), self.arch, self.label)))

    def __str__(self) -> str:
        return self.id


PEFT_PREFIX = "base_model.model."


def random_masks(arch: str, seed: int, density: float = 0.05) -> dict[str, torch.Tensor]:
    """A mask for every decoder-block linear weight (stored layout), keyed by parameter name."""
    generator = torch.Generator().manual_seed(seed)
    model = build_tiny_model(arch)
    modules = dict(model.named_modules())
    return {
        f"{name}.weight": torch.rand(modules[name].weight.shape, generator=generator) < density
        for name in dense_linears(arch)
    }


def adapt_masked_lr(model: nn.Module, case: Case, adapter_name: str, seed: int) -> PeftModel:
    config = MaskedLRConfig(**case.options)
    return get_masked_lr_model(model, config, random_masks(case.arch, seed), adapter_name)


def masked_lr_trainable(case: Case, config: MaskedLRConfig, adapter: str, seed: int) -> dict:
    """The values inside each mask (and outside it when ``outside_lr_scale`` > 0)."""
    expected = {}
    for name, mask in random_masks(case.arch, seed).items():
        module = PEFT_PREFIX + name.removesuffix(".weight")
        expected[f"{module}.masked_lr_inside.{adapter}"] = (int(mask.sum()),)
        if config.outside_lr_scale > 0:
            expected[f"{module}.masked_lr_outside.{adapter}"] = (int((~mask).sum()),)
    return expected


def calibration() -> torch.Tensor:
    return make_token_windows(n=8, length=32, seed=1)


def adapt_basis_sharing(model: nn.Module, case: Case, adapter_name: str, seed: int) -> PeftModel:
    config = BasisSharingConfig(**case.options)
    return get_basis_sharing_model(model, config, calibration(), adapter_name=adapter_name)


def basis_sharing_trainable(
    case: Case, config: BasisSharingConfig, adapter: str, seed: int
) -> dict:
    """Every decoder linear's coefficients ``[d_out, rank]`` (the default target roles are all
    roles), and each basis ``[rank, d_in]`` once when ``train_bases``."""
    expected = {}
    for name, (d_out, d_in) in dense_linears(case.arch).items():
        key = config.layer_groups[name]
        rank = config.group_ranks[key]
        if config.train_coefficients:
            expected[f"{PEFT_PREFIX}{name}.basis_sharing_coefficient.{adapter}"] = (d_out, rank)
        if config.train_bases:
            expected[f"base_model.basis_sharing_bases.{adapter}.{key}"] = (rank, d_in)
    return expected


def adapt_spd(model: nn.Module, case: Case, adapter_name: str, seed: int) -> PeftModel:
    options = {"C": 4, "target_modules": list(dense_linears(case.arch)), **case.options}
    torch.manual_seed(seed)  # initial components and gates
    return get_spd_model(model, SPDConfig(**options), adapter_name)


def spd_trainable(case: Case, config: SPDConfig, adapter: str, seed: int) -> dict:
    """``U [d_out, C]``, ``V [C, d_in]`` (not on a tied layer) and the gates of every target."""
    C, H = config.C, config.gate_hidden
    tied = set((config.tied_modules or {}).keys())
    expected = {}
    for name, (d_out, d_in) in dense_linears(case.arch).items():
        shapes = {"spd_gate_w1": (C, H), "spd_gate_b1": (C, H), "spd_gate_w2": (C, H)}
        shapes["spd_gate_b2"] = (C,)
        if name not in tied:
            shapes.update(spd_U=(d_out, C), spd_V=(C, d_in))
        for attr, shape in shapes.items():
            expected[f"{PEFT_PREFIX}{name}.{attr}.{adapter}"] = shape
    return expected


MASKED_LR = Method(
    peft_type="MASKED_LR",
    prefix="masked_lr_",
    adapt=adapt_masked_lr,
    expected_trainable=masked_lr_trainable,
    nudge=noise(0.05, relative=False),  # the delta starts at zero
    weighted_error=r"masked_lr.*add_weighted_adapter.*hf_sparse\.merging\.merge_",
    # 5% of the values + one bit per entry; outside_lr_scale > 0 stores every entry
    small_file=lambda options: not options.get("outside_lr_scale"),
)
BASIS_SHARING = Method(
    peft_type="BASIS_SHARING",
    prefix="basis_sharing_",
    adapt=adapt_basis_sharing,
    expected_trainable=basis_sharing_trainable,
    nudge=noise(0.1, relative=True),
    weighted_error=r"basis_sharing.*add_weighted_adapter.*merge_and_unload",
    small_file=lambda options: True,  # the point of the method
    # The dense weights are dropped once compressed, so there is no base to fall back to.
    disable_error="no dense weight.*cannot be disabled.*merge_and_unload",
    # A second compression needs the dense weights that the first one dropped.
    add_error="already a PeftModel.*dense weights.*load_adapter",
)
SPD = Method(
    peft_type="SPD",
    prefix="spd_",
    adapt=adapt_spd,
    expected_trainable=spd_trainable,
    nudge=noise(0.1, relative=True),
    weighted_error=r"SPD.*add_weighted_adapter.*set_spd_ablation",
    small_file=lambda options: False,  # C components and their gates may outgrow a weight
)

MLP = "model.layers.0.mlp"  # down_proj [32, 64] is up_proj [64, 32] transposed
CASES = [
    *(Case(MASKED_LR, arch) for arch in ARCHS),
    Case(MASKED_LR, "llama", {"outside_lr_scale": 0.25}, "outside"),  # dense second vector
    Case(BASIS_SHARING, "llama", {"ratio": 0.2}),
    Case(BASIS_SHARING, "qwen2", {"ratio": 0.4, "update_coefficients": True}),
    Case(BASIS_SHARING, "opt", {"ratio": 0.2, "train_bases": True}),  # tuner-level parameters
    Case(BASIS_SHARING, "gpt2", {"ratio": 0.25, "layer_refit": True}),
    *(Case(SPD, arch) for arch in ARCHS),
    Case(SPD, "llama", {"tied_modules": {f"{MLP}.down_proj": f"{MLP}.up_proj"}}, "tied"),
]


def adapted(case: Case, seed: int = 0) -> PeftModel:
    """The case's adapter (adapter name ``default``) on a fresh tiny base, nudged."""
    model = case.method.adapt(build_tiny_model(case.arch), case, "default", seed)
    case.method.nudge(model, seed)
    return model.eval()


@dataclass
class Saved:
    folder: Path
    logits: torch.Tensor
    targets: list[str]  # names of the adapted modules


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[Case, int], Saved]:
    """``saved(case, seed)``: the nudged adapter saved once per module, with its logits."""
    cache: dict[tuple[str, int], Saved] = {}

    def get(case: Case, seed: int = 0) -> Saved:
        if (case.id, seed) not in cache:
            model = adapted(case, seed)
            folder = tmp_path_factory.mktemp(f"{case.id}-{seed}")
            model.save_pretrained(folder)
            targets = [
                name.removeprefix(PEFT_PREFIX)
                for name, module in model.named_modules()
                if isinstance(module, BaseTunerLayer)
            ]
            cache[case.id, seed] = Saved(folder, logits(model), targets)
        return cache[case.id, seed]

    return get


parametrize_cases = pytest.mark.parametrize("case", CASES, ids=str)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine a second thread
    makes each small matmul several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ the contract


def test_the_table_covers_every_method_on_every_architecture():
    """A PEFT method registered by hf_sparse but missing here would escape the contract."""
    ours = {
        peft_type.value
        for peft_type, tuner in PEFT_TYPE_TO_TUNER_MAPPING.items()
        if tuner.__module__.startswith("hf_sparse.")
    }
    methods = {case.method.peft_type for case in CASES}
    assert methods == ours
    covered = {(case.method.peft_type, case.arch) for case in CASES}
    assert covered >= {(method, arch) for method in ours for arch in ARCHS}


@parametrize_cases
def test_disabled_adapter_gives_the_base_model(case):
    """The adapter changes the logits; ``disable_adapter()`` gives the base model's exactly,
    or, for a method that keeps no base weight (``disable_error``), raises its clear error."""
    base = logits(build_tiny_model(case.arch))
    model = adapted(case)
    adapted_logits = logits(model)
    assert not torch.allclose(adapted_logits, base, atol=1e-3), "the adapter is a no-op"
    with model.disable_adapter():
        if case.method.disable_error is None:
            assert torch.equal(logits(model), base)
        else:
            with pytest.raises(RuntimeError, match=case.method.disable_error):
                model(input_ids=IDS)
    assert torch.equal(logits(model), adapted_logits)  # enabled again


@parametrize_cases
def test_trainable_parameters_are_exactly_the_adapters(case):
    model = case.method.adapt(build_tiny_model(case.arch), case, "default", 0)
    expected = case.method.expected_trainable(case, model.peft_config["default"], "default", 0)
    assert trainable_shapes(model) == expected  # names and shapes; no base parameter
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(math.prod(shape) for shape in expected.values()) < total


@parametrize_cases
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=lambda v: f"low_cpu_mem={v}")
def test_save_then_reload_in_process(case, saved, low_cpu_mem_usage):
    """Same logits after ``from_pretrained`` on a fresh base; ``is_trainable`` gives back the
    same trainable parameters."""
    adapter = saved(case)
    loaded = PeftModel.from_pretrained(
        build_tiny_model(case.arch),
        adapter.folder,
        is_trainable=True,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    torch.testing.assert_close(logits(loaded), adapter.logits, **RELOADED)
    expected = case.method.expected_trainable(case, loaded.peft_config["default"], "default", 0)
    assert trainable_shapes(loaded) == expected


FRESH_PROCESS = """
import json, sys, traceback
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from tests.conftest import build_tiny_model

torch.set_num_threads(1)  # as in the tests that saved the reference logits

folder = Path(sys.argv[1])
jobs = json.loads((folder / "jobs.json").read_text())
ids = load_file(folder / "ids.safetensors")["ids"]
report = {job["id"]: {} for job in jobs}
for job in jobs:  # peft alone does not know hf_sparse's methods
    try:
        PeftModel.from_pretrained(build_tiny_model(job["arch"]), job["adapter"])
    except KeyError as error:
        report[job["id"]]["unregistered"] = repr(error)

import hf_sparse  # registers the methods

out = {}
for job in jobs:
    try:
        model = PeftModel.from_pretrained(build_tiny_model(job["arch"]), job["adapter"]).eval()
        with torch.no_grad():
            out[job["id"]] = model(input_ids=ids).logits
    except Exception:
        report[job["id"]]["error"] = traceback.format_exc()
save_file(out, folder / "logits.safetensors")
(folder / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_process(saved, tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every case's saved adapter loaded by one new interpreter (one start-up for all):
    ``({case id: logits}, {case id: {"unregistered": error before import hf_sparse,
    "error": traceback}})``."""
    folder = tmp_path_factory.mktemp("fresh")
    jobs = [{"id": c.id, "arch": c.arch, "adapter": str(saved(c).folder)} for c in CASES]
    (folder / "jobs.json").write_text(json.dumps(jobs))
    save_file({"ids": IDS}, folder / "ids.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((folder / "report.json").read_text())
    return load_file(folder / "logits.safetensors"), report


@pytest.mark.slow  # one fresh interpreter for all cases: torch + transformers + peft, ~5 s
@parametrize_cases
def test_save_then_reload_in_a_fresh_process(case, saved, fresh_process):
    """A new Python process that builds the same tiny base and calls ``from_pretrained`` gets
    the saved logits; before ``import hf_sparse`` peft refuses with the method's name."""
    out, report = fresh_process
    assert "error" not in report[case.id], report[case.id]["error"]
    assert case.method.peft_type in report[case.id].get("unregistered", "loaded without us")
    torch.testing.assert_close(out[case.id], saved(case).logits, **RELOADED)


@parametrize_cases
def test_merge_and_unload_gives_a_plain_model_with_the_adapted_logits(case):
    model = adapted(case)
    expected = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, **MERGED)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), expected, **MERGED)
    merged = model.merge_and_unload()
    base = build_tiny_model(case.arch)
    assert type(merged) is type(base)
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())
    shapes = {name: tuple(t.shape) for name, t in merged.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in base.state_dict().items()}
    torch.testing.assert_close(logits(merged), expected, **MERGED)


@parametrize_cases
def test_adapter_file_holds_no_base_weights(case, saved):
    adapter = saved(case)
    files = {path.name for path in adapter.folder.iterdir()}
    assert {ADAPTER_FILE, "adapter_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((adapter.folder / "adapter_config.json").read_text())
    assert config["peft_type"] == case.method.peft_type
    with safe_open(adapter.folder / ADAPTER_FILE, "pt") as handle:
        keys = list(handle.keys())
    base = build_tiny_model(case.arch)
    base_names = set(base.state_dict())
    assert keys and not base_names & {key.removeprefix(PEFT_PREFIX) for key in keys}
    assert all(case.method.prefix in key for key in keys), keys
    if case.method.small_file(case.options):
        modules = dict(base.named_modules())
        target_bytes = sum(
            modules[name].weight.numel() * modules[name].weight.element_size()
            for name in adapter.targets
        )
        assert (adapter.folder / ADAPTER_FILE).stat().st_size < target_bytes


@parametrize_cases
def test_two_adapters_follow_the_active_one(case, saved):
    """A second adapter loaded (``load_adapter``) or added in memory under another name is
    inactive until ``set_adapter`` picks it; the logits then follow the active adapter.
    Methods that cannot add one in memory (``add_error``) raise their clear error."""
    model = adapted(case)
    first = logits(model)
    other = saved(case, seed=1)
    assert not torch.allclose(other.logits, first, atol=1e-3)
    model.load_adapter(other.folder, adapter_name="other")
    torch.testing.assert_close(logits(model), first, **RELOADED)
    model.set_adapter("other")
    torch.testing.assert_close(logits(model), other.logits, **RELOADED)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model), first, **RELOADED)
    if case.method.add_error is not None:
        with pytest.raises(ValueError, match=case.method.add_error):
            case.method.adapt(model, case, "added", 1)
        return
    case.method.adapt(model, case, "added", 1)
    torch.testing.assert_close(logits(model), first, **RELOADED)
    model.set_adapter("added")
    expected = case.method.expected_trainable(case, model.peft_config["added"], "added", 1)
    assert trainable_shapes(model) == expected
    case.method.nudge(model, 1)  # the same values as the saved seed-1 adapter
    torch.testing.assert_close(logits(model), other.logits, **RELOADED)


@parametrize_cases
def test_add_weighted_adapter_is_refused_clearly(case):
    model = adapted(case)
    with pytest.raises(NotImplementedError, match=case.method.weighted_error):
        model.add_weighted_adapter(["default"], [1.0], adapter_name="combined")
    assert list(model.peft_config) == ["default"]
