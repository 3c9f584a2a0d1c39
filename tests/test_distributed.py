"""Two CPU processes (torchrun + gloo) on two shards prune like one process on all windows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_prune as script
import pytest
import torch
from safetensors.torch import load_file

from hf_sparse.calibration import distributed_world
from hf_sparse.pruning import WandaConfig, prune_

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("distributed_prune.py")
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


README = Path(__file__).resolve().parents[1] / "README.md"
# how each launcher of the README is started from this interpreter, and its port flag
LAUNCHERS = {
    "torchrun": ([sys.executable, "-m", "torch.distributed.run"], "--master_port"),
    "accelerate launch": ([sys.executable, "-m", "accelerate.commands.launch"],
                          "--main_process_port"),
}  # fmt: skip


def readme_command(launcher: str) -> list[str]:
    """The README's command line for ``launcher``, as argv (``prune_script.py`` = its script)."""
    lines = [line.strip() for line in README.read_text().splitlines()]
    found = [
        line for line in lines if line.startswith(launcher + " ") and "prune_script.py" in line
    ]
    assert len(found) == 1, f"README should give one '{launcher} ... prune_script.py' line"
    return found[0].split()[len(launcher.split()) :]


def launch(launcher: str, out_dir: Path) -> None:
    """Run the README's command for ``launcher`` on the test script, writing to ``out_dir``."""
    env = {
        k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("ACCELERATE_")
    }
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    prefix, port_flag = LAUNCHERS[launcher]
    args = readme_command(launcher)
    script = args.index("prune_script.py")
    args[script : script + 1] = [str(SCRIPT), str(out_dir)]
    command = [*prefix, port_flag, str(_free_port()), *args]
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent
    )
    assert proc.returncode == 0, f"{launcher} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("distributed")
    launch("torchrun", out_dir)
    return out_dir


@pytest.mark.slow
def test_accelerate_launch_command_of_the_readme_runs_two_processes(tmp_path, single_process):
    """The script asserts two ranks; the masks and weights equal the one-process run."""
    launch("accelerate launch", tmp_path)
    for method in script.CONFIGS:
        state = load_file(str(tmp_path / f"{method}.safetensors"))
        assert state.keys() == single_process[method].keys()
        for name, value in single_process[method].items():
            assert torch.equal(state[name], value), name


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor]]:
    windows = script.calibration_set()
    results = {name: script.prune_state(name, windows) for name in script.CONFIGS}
    results["stats"] = script.block0_stats(windows)
    results["importance"] = script.importance_scores(windows)
    results["merge"] = script.merge_state(script.merge_streams())
    return results


def _split(state: dict[str, torch.Tensor]):
    masks = {k: v for k, v in state.items() if k.startswith("mask.")}
    weights = {k: v for k, v in state.items() if not k.startswith("mask.")}
    return weights, masks


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_two_processes_match_one(two_process_run, single_process, method):
    distributed_weights, distributed_masks = _split(
        load_file(str(two_process_run / f"{method}.safetensors"))
    )
    weights, masks = _split(single_process[method])
    assert distributed_masks.keys() == masks.keys() and len(masks) == 14
    differing = sum(int((distributed_masks[k] != masks[k]).sum()) for k in masks)
    assert differing == 0, f"{differing} mask entries differ between 1 and 2 processes"
    assert distributed_weights.keys() == weights.keys()
    for name, weight in weights.items():  # ordered reduction: the very same bits
        assert torch.equal(distributed_weights[name], weight), name
    for name, keep in masks.items():  # the saved weights honour the mask
        linear = name.removeprefix("mask.")
        assert torch.count_nonzero(distributed_weights[f"{linear}.weight"][~keep]) == 0


def test_all_reduced_statistics_match_one_process(two_process_run, single_process):
    distributed = load_file(str(two_process_run / "stats.safetensors"))
    expected = single_process["stats"]
    assert distributed.keys() == expected.keys()
    assert any(k.startswith("xtx.") for k in expected)
    for key, value in expected.items():
        if key.startswith("tokens."):
            # all 8 windows of 32 tokens, summed over both ranks
            assert int(distributed[key]) == int(value) == 8 * 32, key
        else:  # summed in the same tree over window positions: the same bits
            assert torch.equal(distributed[key], value), key


def test_importance_scores_all_reduce_to_the_single_process_scores(two_process_run, single_process):
    distributed = load_file(str(two_process_run / "importance.safetensors"))
    expected = single_process["importance"]
    assert distributed.keys() == expected.keys()
    assert {k.split(".")[0] for k in expected} == set(script.IMPORTANCE_METRICS)
    for key, value in expected.items():
        atol = 1e-5 * float(value.abs().max())
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=atol, msg=key)


def test_world_size_without_process_group_fails_clearly(monkeypatch):
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this pytest process")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        distributed_world()
    model = script.build_model()
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        prune_(model, WandaConfig(sparsity=0.5), script.calibration_set(), show_progress=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed_world() == (0, 1)


def test_sparsegpt_tv_merge_on_two_processes_matches_one(two_process_run, single_process):
    distributed = load_file(str(two_process_run / "merge.safetensors"))
    single = single_process["merge"]
    assert distributed.keys() == single.keys()
    for name, value in single.items():
        assert torch.equal(distributed[name], value), name
