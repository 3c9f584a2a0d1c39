"""``PeftModel.from_pretrained`` / ``load_adapter`` on every hf_sparse adapter type, with the
adapter tampered or the wrong base: each case is an ``AdapterIntegrityError`` naming the
difference (an edited ``target_modules``, another base by its shapes or by its weights, a
tensor missing from the file or one too many); ``hf_sparse_strict=False`` turns each into a
warning. A loaded adapter never keeps a randomly initialised component.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from hf_sparse.integrity import AdapterIntegrityError
from hf_sparse.masked_lr import MaskedLRConfig, get_masked_lr_model
from hf_sparse.spd import SPDConfig, get_spd_model
from tests.bad_input.common import first_line
from tests.conftest import build_tiny_model, make_token_windows

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
IDS = make_token_windows(n=2, length=12, seed=3)
UP = [f"model.layers.{i}.mlp.up_proj" for i in range(2)]


def _masked_lr(model):
    generator = torch.Generator().manual_seed(0)
    masks = {
        f"{name}.weight": torch.rand(dict(model.named_modules())[name].weight.shape,
                                     generator=generator) < 0.1
        for name in UP
    }  # fmt: skip
    return get_masked_lr_model(model, MaskedLRConfig(), masks)


def _basis_sharing(model):
    config = BasisSharingConfig(ratio=0.2, target_roles=["up"], whitening=False)
    return get_basis_sharing_model(model, config)


def _spd(model):
    torch.manual_seed(0)
    return get_spd_model(model, SPDConfig(C=3, target_modules=["up_proj"]))


METHODS: dict[str, Callable] = {
    "masked_lr": _masked_lr,
    "basis_sharing": _basis_sharing,
    "spd": _spd,
}


def _nudge(model) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def save_adapters(root: Path) -> dict[str, tuple[Path, torch.Tensor]]:
    """Each method's adapter on the tiny llama (seed 0), saved under ``root``: (folder, its
    logits)."""
    out = {}
    for method, make in METHODS.items():
        model = make(build_tiny_model("llama")).eval()
        _nudge(model)
        folder = root / method
        model.save_pretrained(folder)
        with torch.no_grad():
            out[method] = (folder, model(input_ids=IDS).logits)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    return save_adapters(tmp_path_factory.mktemp("adapters"))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(folder / ADAPTER_FILE)
    edit(tensors)
    save_file(tensors, folder / ADAPTER_FILE)


def _drop_one(tensors: dict) -> None:
    tensors.pop(sorted(k for k in tensors if "layers.1" in k)[0])


def _add_one(tensors: dict) -> None:
    key = sorted(k for k in tensors if "layers.1" in k)[0]
    tensors[key.replace("layers.1", "layers.7")] = tensors[key].clone()


@dataclass(frozen=True)
class AdapterCase:
    id: str
    tamper: Callable[[Path], None] | None  # what was done to the saved folder
    base: Callable[[], torch.nn.Module]  # the base it is loaded on
    message: str  # searched in the error's first line

    @property
    def entry(self) -> str:
        return "PeftModel.from_pretrained"


def _llama(**kw):
    return lambda: build_tiny_model("llama", **kw)


CASES = [
    AdapterCase("edited-target-modules", lambda f: _edit_config(f, target_modules=["o_proj"]),
                _llama(), r"target_modules selects \[.*o_proj.*\], but not \[.*up_proj.*\].*"
                          r"adapter_config.json edited"),
    # a suffix pattern (SPD's up_proj) selects the extra layers; explicit names (the plan,
    # the masks) find the same two modules, whose weights differ
    AdapterCase("unrelated-4-layer-base", None, _llama(num_hidden_layers=4),
                r"selects \[.*layers.2.mlp.up_proj.*\].*made for exactly 2 modules|base "
                r"weights differ"),
    AdapterCase("other-shapes-base", None, _llama(intermediate_size=48),
                r"shapes differ \(\['model.layers.0.mlp.up_proj: \[48, 32\] here, \[64, 32\] "
                r"in the adapter'"),
    AdapterCase("same-shapes-other-weights", None, _llama(seed=1),
                r"base weights differ from those the adapter was made from \(e.g. "
                r"model.layers.0.mlp.up_proj: .* here, .* when it was made\)"),
    AdapterCase("missing-tensor", lambda f: _edit_tensors(f, _drop_one), _llama(),
                r"adapter file lacks 1 tensor\(s\) .*layers.1.mlp.up_proj.*randomly initialised"),
    AdapterCase("extra-tensor", lambda f: _edit_tensors(f, _add_one), _llama(),
                r"adapter file holds 1 tensor\(s\) no adapted module uses .*layers.7"),
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prepared(saved, method: str, case: AdapterCase, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(saved[method][0], folder)
    if case.tamper is not None:
        case.tamper(folder)
    return folder


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mismatched_adapter_is_refused(method, case, saved, tmp_path):
    folder = _prepared(saved, method, case, tmp_path)
    with pytest.raises(AdapterIntegrityError) as raised:
        PeftModel.from_pretrained(case.base(), folder)
    line = first_line(str(raised.value))
    assert line.startswith(method.upper()), line
    assert re.search(case.message, line), line
    assert "hf_sparse_strict=False" in line  # says how to load it anyway


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_strict_false_loads_with_a_warning(method, case, saved, tmp_path):
    folder = _prepared(saved, method, case, tmp_path)
    with pytest.warns(UserWarning, match=r"loaded anyway: integrity='warn'"):
        try:
            PeftModel.from_pretrained(case.base(), folder, hf_sparse_strict=False)
        except (RuntimeError, ValueError, KeyError) as error:
            # past the warning, peft itself may still fail (shapes that cannot be loaded):
            # never our integrity error
            assert not isinstance(error, AdapterIntegrityError), error


@pytest.mark.parametrize("method", list(METHODS))
def test_load_adapter_checks_the_second_adapter_too(method, saved, tmp_path):
    case = CASES[0]
    folder = _prepared(saved, method, case, tmp_path)
    model = PeftModel.from_pretrained(build_tiny_model("llama"), saved[method][0])
    with pytest.raises(AdapterIntegrityError, match="target_modules selects"):
        model.load_adapter(folder, adapter_name="other")


@pytest.mark.parametrize("method", list(METHODS))
def test_the_right_base_loads_exactly_also_in_another_dtype(method, saved):
    """No false alarm: the base it was made on loads (same logits); the same base cast to
    bfloat16 matches the record up to rounding."""
    folder, expected = saved[method]
    loaded = PeftModel.from_pretrained(build_tiny_model("llama"), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no integrity warning either
        PeftModel.from_pretrained(build_tiny_model("llama").to(torch.bfloat16), folder)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_record_round_trips_and_names_the_adapted_modules(method, saved):
    record = json.loads((saved[method][0] / CONFIG_FILE).read_text())["base_record"]
    assert sorted(record["modules"]) == UP
    assert record["model_type"] == "llama" and len(record["rows_sha256"]) == 64
    assert all(len(m["probe"]) == 6 and m["shape"] == [64, 32] for m in record["modules"].values())
