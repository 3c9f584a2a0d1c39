"""The study's ranking modes (layer, head), checkpoint stability inside a study, and
downstream evaluation run from a study config."""

from __future__ import annotations

import json

import pytest
import torch

from hf_sparse.analysis.config import AnalysisConfig
from hf_sparse.analysis.study import run_study, select_top
from hf_sparse.models import parameter_layouts
from tests.conftest import build_tiny_model, build_word_tokenizer

TEXT = " ".join(f"w{i % 97} w{(i * 7) % 89}" for i in range(4000))


def _scores(model):
    generator = torch.Generator().manual_seed(0)
    return {
        n: torch.rand(p.shape, generator=generator)
        for n, p in model.named_parameters()
        if n.endswith("proj.weight")
    }


def test_layer_mode_keeps_the_same_share_of_every_tensor():
    model = build_tiny_model("llama")
    scores = _scores(model)
    total = sum(s.numel() for s in scores.values())
    top = select_top(model, scores, total // 10, "layer")
    for name, score in scores.items():
        assert int(top[name].sum()) == pytest.approx(score.numel() / 10, abs=1)
        kept = score[top[name]]
        assert kept.min() >= score[~top[name]].max()  # each tensor's own top entries


def test_head_mode_keeps_the_same_share_of_every_attention_head():
    model = build_tiny_model("llama")
    scores = _scores(model)
    total = sum(s.numel() for s in scores.values())
    top = select_top(model, scores, total // 8, "head")
    layouts = parameter_layouts(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    width = layouts[name].head_size
    per_head = top[name].reshape(-1, width, top[name].shape[1]).sum((1, 2))
    assert per_head.numel() == model.config.num_attention_heads
    assert (per_head == per_head[0]).all() and int(per_head[0]) > 0
    # a head's strongest score is kept even when it is below other heads' kept scores
    score = scores[name].reshape(-1, width, scores[name].shape[1])
    best_per_head = score.flatten(1).max(1).values
    kept = top[name].reshape(score.shape)
    assert all(kept[h].flatten()[score[h].flatten().argmax()] for h in range(len(best_per_head)))


@pytest.mark.slow  # a study with checkpoints and lm-eval: 115 s on the loaded shared machine
def test_study_with_head_mode_checkpoints_and_downstream(tmp_path, monkeypatch):
    (tmp_path / "text.txt").write_text(TEXT)
    data = tmp_path / "data"
    (data / "lambada").mkdir(parents=True)
    (data / "lambada" / "lambada_test.jsonl").write_text(
        "\n".join(json.dumps({"text": f"w1 w7 w2 w{i}"}) for i in range(3))
    )
    monkeypatch.setenv("HF_SPARSE_DATA_DIR", str(data))
    model = build_tiny_model("llama")
    same, other = tmp_path / "ckpt-same", tmp_path / "ckpt-other"
    model.save_pretrained(same)
    build_tiny_model("llama", seed=1).save_pretrained(other)
    tokenizer = build_word_tokenizer(TEXT)
    tokenizer.eos_token = "[UNK]"
    text = str(tmp_path / "text.txt")
    config = AnalysisConfig(
        metric="gradient", top_k=64, mode="head", dataset=text, eval_dataset=text,
        num_samples=2, sequence_length=16, eval_windows=1, eval_length=16, control_seeds=1,
        stability_seeds=[0], stability_subsets=0, checkpoints=[str(same), str(other)],
        n_clusters=2, single_weight_candidates=0, cluster_perturbation=False,
        downstream_tasks=["lambada"], downstream_limit=3,
    )  # fmt: skip
    result = run_study(model, tokenizer, config, tmp_path / "study", show_progress=False)
    assert result["stats"]["mode"] == "head"
    stability = json.loads((tmp_path / "study" / "stability.json").read_text())
    checkpoints = stability["checkpoints"]
    assert checkpoints["labels"] == ["ckpt-same", "ckpt-other"]
    jaccard = torch.tensor(checkpoints["jaccard"])
    assert jaccard[0, 0] == 1 and jaccard[0, 1] < 0.5  # another model, another critical set
    down = json.loads((tmp_path / "study" / "perturbation_results.json").read_text())
    down = down["downstream"]
    assert down["top_k"] == result["stats"]["top_k"]
    assert set(down["before"]) == set(down["after_zeroing_top_k"]) == {"lambada"}
    assert 0 <= down["before"]["lambada"]["acc"] <= 1
    assert "Downstream tasks" in (tmp_path / "study" / "report.html").read_text()


@pytest.mark.slow  # a small study: ~5 s
def test_a_study_of_one_layer_skips_the_layer_correlation(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    text = str(tmp_path / "text.txt")
    config = AnalysisConfig(
        metric="magnitude", top_k=16, params=["re:model\\.layers\\.0\\..*proj\\.weight"],
        dataset=text, eval_dataset=text, num_samples=2, sequence_length=16, eval_windows=1,
        eval_length=16, control_seeds=1, stability_seeds=[0], stability_subsets=0,
        n_clusters=2, single_weight_candidates=0,
    )  # fmt: skip
    model, tokenizer = build_tiny_model("llama"), build_word_tokenizer(TEXT)
    result = run_study(model, tokenizer, config, tmp_path / "study", show_progress=False)
    assert "at least two decoder layers" in result["stats"]["layer_correlation"]["skipped"]
    assert result["results"]["cluster_perturbations"]
