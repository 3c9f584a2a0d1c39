"""The built wheel is complete: installed on its own (not the checkout), every module imports,
``hf_sparse.callbacks`` (from ``callbacks/``) and the model card template (from
``model_cards/``) are inside it.

The sources are copied to a temporary folder first, so building leaves no ``build/`` or
egg-info behind in the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, pkgutil, sys
from pathlib import Path

target = Path(sys.argv[1]).resolve()
def inside(path):
    return Path(path).resolve().is_relative_to(target)

import hf_sparse
assert inside(hf_sparse.__file__), f"hf_sparse imported from {hf_sparse.__file__}, not the wheel"
names = [m.name for m in pkgutil.walk_packages(hf_sparse.__path__, "hf_sparse.")]
for name in ["hf_sparse.callbacks", "hf_sparse.callbacks.pruning", "hf_sparse.model_cards"]:
    assert name in names, f"{name} missing from the wheel: {names}"
for name in names:
    module = importlib.import_module(name)
    assert inside(module.__file__), f"{name} imported from {module.__file__}"

from hf_sparse.callbacks import PruningCallback
from hf_sparse.pruning import WandaConfig
PruningCallback(WandaConfig(sparsity=0.5))

from hf_sparse.hub import load_template
template = load_template()
assert "$method" in template.template, template.template[:200]
print("ok", len(names), "modules")
"""


def _copy_sources(dest: Path) -> None:
    """pyproject.toml, README/LICENSE when present, and the folders the packages live in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_cfg = project["tool"]["setuptools"]
    package_dirs = setuptools_cfg.get("package-dir", {})
    folders = {
        package_dirs.get(p, p.replace(".", "/")).split("/")[0] for p in setuptools_cfg["packages"]
    }
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in sorted(folders):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    for name in ["pyproject.toml", "README.md", "LICENSE"]:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)


def _build_wheel(source: Path, dist: Path) -> Path:
    if importlib.util.find_spec("build") is not None:
        # --skip-dependency-check: the `wheel` build requirement is not needed by setuptools>=70.1
        command = [sys.executable, "-m", "build", "--wheel", "--no-isolation"]
        command += ["--skip-dependency-check", "--outdir", str(dist), str(source)]
    else:
        command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps"]
        command += ["--no-build-isolation", "-w", str(dist)]
    proc = subprocess.run(command, cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"wheel build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    wheels = list(dist.glob("hf_sparse-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_checkout(tmp_path):
    source, dist, target, run_dir = (tmp_path / d for d in ("src", "dist", "target", "run"))
    source.mkdir()
    run_dir.mkdir()
    _copy_sources(source)
    wheel = _build_wheel(source, dist)

    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
    install += ["--target", str(target), str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "hf_sparse" / "model_cards" / "pruned_model.md").is_file()
    assert (target / "hf_sparse" / "callbacks" / "pruning.py").is_file()
    assert (target / "bin" / "hf-sparse").is_file(), "console script not installed"

    # -P: no cwd / script folder on sys.path; the checkout is neither cwd nor on PYTHONPATH.
    # (The venv's editable-install finder sits after the path finder, so the wheel wins.)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-P", "-c", CHECK, str(target)],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.startswith("ok"), proc.stdout
