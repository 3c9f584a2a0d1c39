"""Input statistics and the sequential block engine (hf_sparse.calibration) on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, LAYERS, build_tiny_model, make_token_windows

from hf_sparse.calibration import (
    InputStats,
    StatsCollector,
    capture_block_inputs,
    run_sequential,
)
from hf_sparse.models import (
    find_decoder_blocks,
    linear_role,
    set_weight_matrix,
    target_linears,
    weight_matrix,
)

# Roles whose layers read one and the same input tensor, per architecture.
SHARED_GROUPS = {
    "llama": [{"q", "k", "v"}, {"gate", "up"}],
    "mistral": [{"q", "k", "v"}, {"gate", "up"}],
    "qwen2": [{"q", "k", "v"}, {"gate", "up"}],
    "opt": [{"q", "k", "v"}],
    "gpt2": [],
    "gpt_neox": [],
}


def _block_linears(model, index: int = 0) -> dict[str, torch.nn.Module]:
    return list(target_linears(model).values())[index]


def _capture_linear_inputs(linears):
    """Separate forward hooks recording each layer's input rows, as a cross-check."""
    seen = {name: [] for name in linears}
    handles = [
        module.register_forward_hook(
            lambda _m, args, _out, name=name: seen[name].append(args[0].detach().clone())
        )
        for name, module in linears.items()
    ]
    return seen, handles


def _reference_xtx(inputs: list[torch.Tensor]) -> torch.Tensor:
    """Sum of outer products of every input row, in float64, one row at a time."""
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()
    total = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for row in rows:
        total += torch.outer(row, row)
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_stats_collector_matches_bruteforce(arch):
    model = build_tiny_model(arch)
    linears = _block_linears(model)
    batches = [make_token_windows(n=2, length=8, seed=s) for s in (0, 1)]
    seen, handles = _capture_linear_inputs(linears)
    collector = StatsCollector(linears, need_xtx=True, need_sq_norms=True, dtype=torch.float64)
    with torch.no_grad(), collector:
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()

    assert set(collector.stats) == set(linears)
    role_of = {name: linear_role(name) for name in linears}
    for name, stats in collector.stats.items():
        assert len(seen[name]) == len(batches)
        expected = _reference_xtx(seen[name])
        assert stats.xtx.dtype == torch.float64
        torch.testing.assert_close(stats.xtx, expected, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(stats.sq_norms, torch.diag(stats.xtx), rtol=1e-12, atol=1e-10)
        assert stats.tokens == sum(b.numel() for b in batches)
        torch.testing.assert_close(stats.hessian, expected / stats.tokens, rtol=1e-10, atol=1e-8)

    # Sharing: one object per group of layers reading the same tensor, and only those.
    groups = SHARED_GROUPS[arch]
    for group in groups:
        names = [n for n in linears if role_of[n] in group]
        objects = {id(collector.stats[n]) for n in names}
        assert len(names) == len(group) and len(objects) == 1
        shared = collector.stats[names[0]]
        owners = [n for n in names if n not in shared.shared_with]
        assert len(owners) == 1 and sorted(shared.shared_with + owners) == sorted(names)
    grouped_names = {n for n in linears if any(role_of[n] in g for g in groups)}
    distinct = {id(s) for s in collector.stats.values()}
    assert len(distinct) == len(linears) - len(grouped_names) + len(groups)
    for name in set(linears) - grouped_names:
        assert collector.stats[name].shared_with == []


def test_stats_collector_llama_sharing_names():
    model = build_tiny_model("llama")
    linears = _block_linears(model)
    prefix = "model.layers.0."
    with torch.no_grad(), StatsCollector(linears, True, True) as collector:
        model(make_token_windows(n=1, length=8))
    stats = collector.stats
    q, k, v = (stats[prefix + f"self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert q.shared_with == [prefix + "self_attn.k_proj", prefix + "self_attn.v_proj"]
    gate, up = stats[prefix + "mlp.gate_proj"], stats[prefix + "mlp.up_proj"]
    assert gate is up and gate is not q
    assert gate.shared_with == [prefix + "mlp.up_proj"]
    assert stats[prefix + "self_attn.o_proj"] is not stats[prefix + "mlp.down_proj"]
    assert q.tokens == 8 and q.xtx.dtype == torch.float32


def test_stats_collector_without_xtx():
    model = build_tiny_model("llama")
    linears = _block_linears(model)
    batch = make_token_windows(n=2, length=8)
    seen, handles = _capture_linear_inputs(linears)
    with torch.no_grad(), StatsCollector(linears, need_xtx=False, need_sq_norms=True) as collector:
        model(batch)
    for handle in handles:
        handle.remove()
    for name, stats in collector.stats.items():
        assert stats.xtx is None
        rows = seen[name][0].reshape(-1, seen[name][0].shape[-1])
        torch.testing.assert_close(stats.sq_norms, (rows**2).sum(0))
        with pytest.raises(ValueError, match="without X\\^T X"):
            _ = stats.hessian


def test_stats_collector_removes_hooks():
    model = build_tiny_model("llama")
    linears = _block_linears(model)
    with torch.no_grad(), StatsCollector(linears, True, False) as collector:
        model(make_token_windows(n=1, length=8))
    tokens = {name: s.tokens for name, s in collector.stats.items()}
    with torch.no_grad():
        model(make_token_windows(n=1, length=8, seed=1))
    assert {name: s.tokens for name, s in collector.stats.items()} == tokens
    assert all(not m._forward_hooks for m in linears.values())


def test_input_stats_add_accumulates():
    stats = InputStats(xtx=torch.zeros(3, 3, dtype=torch.float64), sq_norms=torch.zeros(3))
    a, b = torch.randn(2, 4, 3), torch.randn(5, 3)
    stats.add(a)
    stats.add(b)
    expected = _reference_xtx([a, b])
    torch.testing.assert_close(stats.xtx, expected)
    torch.testing.assert_close(stats.sq_norms.double(), torch.diag(expected))
    assert stats.tokens == 13


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_capture_block_inputs_one_entry_per_batch(arch, batch_size):
    model = build_tiny_model(arch)
    first = find_decoder_blocks(model)[0][1]
    windows = make_token_windows(n=5, length=8)
    batches = list(windows.split(batch_size))
    head_calls = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda *args: head_calls.append(1))
    captured = capture_block_inputs(model, first, batches)
    handle.remove()
    assert not head_calls  # the forward stopped at the first block
    assert len(captured.hidden) == len(captured.args) == len(captured.kwargs) == len(batches)
    for hidden, batch in zip(captured.hidden, batches, strict=True):
        assert hidden.shape == (batch.shape[0], 8, model.config.hidden_size)
    if arch == "llama":
        for hidden, batch in zip(captured.hidden, batches, strict=True):
            torch.testing.assert_close(hidden, model.get_input_embeddings()(batch))
    # Re-running the first block on the captured inputs reproduces the model's own call.
    outputs = []
    handle = first.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with torch.no_grad():
        model(batches[0], use_cache=False)
    handle.remove()
    with torch.no_grad():
        again = first(captured.hidden[0], *captured.args[0], **captured.kwargs[0])
    expected = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    got = again[0] if isinstance(again, tuple) else again
    torch.testing.assert_close(got, expected)


def _record_block_inputs(block, store):
    def pre_hook(_module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        store.append(hidden.detach().clone())

    return block.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _output(out):
    return out[0] if isinstance(out, tuple | list) else out


@pytest.mark.parametrize("arch", ARCHS)
def test_run_sequential_propagates_changed_weights(arch):
    model = build_tiny_model(arch)
    original = copy.deepcopy(model)
    calibration = make_token_windows(n=4, length=8, seed=2)
    batch_size = 3  # batches of 3 and 1
    blocks = find_decoder_blocks(model)
    o_layers = {b: next(iter(g.values())) for b, g in target_linears(model, ["o"]).items()}
    seen_by_block1: list[torch.Tensor] = []
    handle = _record_block_inputs(blocks[1][1], seen_by_block1)
    log = []

    def process_block(name, block):
        calls = []
        counter = block.register_forward_hook(lambda *args: calls.append(1))
        log.append(("process", name))

        def finish():
            counter.remove()
            assert len(calls) == 2  # the block saw every batch before it is changed
            layer = o_layers[name]
            set_weight_matrix(layer, torch.zeros_like(weight_matrix(layer)))
            log.append(("finish", name))

        return finish

    model.train()
    run_sequential(
        model,
        calibration,
        process_block,
        batch_size=batch_size,
        show_progress=False,
        after_block=lambda b: log.append(("after", b)),
    )
    handle.remove()

    assert model.training  # the mode is restored
    names = [name for name, _ in blocks]
    assert log == [
        entry
        for name, block in blocks
        for entry in (("process", name), ("finish", name), ("after", block))
    ]
    for name in names:
        assert not o_layers[name].weight.any()
    # Block 1 ran twice per batch (statistics pass, output pass), on the same inputs.
    assert len(seen_by_block1) == 4
    for first, second in zip(seen_by_block1[:2], seen_by_block1[2:], strict=True):
        torch.testing.assert_close(first, second)

    # Reference: the modified block 0 run on block 0's inputs.
    batches = list(calibration.split(batch_size))
    model.eval()
    inputs = capture_block_inputs(model, blocks[0][1], batches)
    old_inputs = capture_block_inputs(original, find_decoder_blocks(original)[0][1], batches)
    old_block0 = find_decoder_blocks(original)[0][1]
    with torch.no_grad():
        for i in range(len(batches)):
            h, a, k = inputs.hidden[i], inputs.args[i], inputs.kwargs[i]
            expected = _output(blocks[0][1](h, *a, **k))
            torch.testing.assert_close(seen_by_block1[i], expected)
            unchanged = _output(
                old_block0(old_inputs.hidden[i], *old_inputs.args[i], **old_inputs.kwargs[i])
            )
            assert not torch.allclose(seen_by_block1[i], unchanged, atol=1e-4)


def test_run_sequential_without_finish_runs_each_block_once():
    model = build_tiny_model("gpt2")
    counts = []

    def process_block(_name, block):
        calls = []
        block.register_forward_hook(lambda *args: calls.append(1))
        counts.append(calls)
        return None

    before = copy.deepcopy(model.state_dict())
    run_sequential(
        model, make_token_windows(n=4, length=8), process_block, batch_size=2, show_progress=False
    )
    assert [len(c) for c in counts] == [2] * LAYERS
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "calibration",
    [torch.zeros(0, 8, dtype=torch.long), torch.arange(8), torch.zeros(2, 3, 4, dtype=torch.long)],
)
def test_run_sequential_rejects_bad_calibration(calibration):
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match=r"non-empty \[n_windows, seq_len\]"):
        run_sequential(model, calibration, lambda *args: None, show_progress=False)


def test_run_sequential_refuses_unreduced_multi_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        run_sequential(
            build_tiny_model("llama"),
            make_token_windows(n=2, length=8),
            lambda *args: None,
            show_progress=False,
        )


@pytest.mark.parametrize("width", [48, 512, 576, 1000, 1536])
def test_gram_from_its_upper_blocks_equals_the_full_product(width):
    from hf_sparse.linalg import gram

    torch.manual_seed(width)
    rows = torch.randn(257, width, dtype=torch.float64)
    full = rows.t() @ rows
    assert torch.allclose(gram(rows), full, rtol=0, atol=1e-10)
    assert torch.equal(gram(rows), gram(rows).t())  # exactly symmetric
    acc = torch.full((width, width), 2.0, dtype=torch.float64)
    gram(rows, out=acc)
    assert torch.allclose(acc, full + 2.0, rtol=0, atol=1e-10)
