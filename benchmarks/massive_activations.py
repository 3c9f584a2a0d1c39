#!/usr/bin/env python3
"""Where SmolLM2-135M's massive activations arise, and what zeroing the weight behind them does.

    .venv/bin/python benchmarks/massive_activations.py            # 18 s on 2 cores

For every block's ``mlp.down_proj``: the largest |input| and |output| entry (and their
channels) over ``--windows`` WikiText-2 validation windows of 256 tokens (seed 0). Then, for
the ``--top`` blocks with the largest output spike, the weight ``down_proj[out channel, in
channel]`` that connects the two spikes is zeroed alone and perplexity measured on the first
``--eval-windows`` WikiText-2 test windows of 512 tokens (dense on the same windows first).
"""

from __future__ import annotations

import argparse

import torch

from hf_sparse.data import calibration_windows, evaluation_windows
from hf_sparse.evaluation import perplexity
from hf_sparse.loading import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    peaks: dict[str, tuple[float, int, float, int]] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            x = inputs[0].abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            y = output.abs().reshape(-1, output.shape[-1]).amax(0)
            peaks[name] = (float(x.max()), int(x.argmax()), float(y.max()), int(y.argmax()))

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if name.endswith("mlp.down_proj")
    ]
    with torch.no_grad():
        model(calibration_windows(tokenizer, "wikitext2", args.windows, 256, 0))
    for handle in handles:
        handle.remove()
    for name, (x_max, x_at, y_max, y_at) in peaks.items():
        print(f"{name}: input max {x_max:.1f} @ {x_at}, output max {y_max:.1f} @ {y_at}")
    windows = evaluation_windows(tokenizer, "wikitext2", 512, args.eval_windows)
    print(
        f"dense perplexity ({args.eval_windows} x 512): {perplexity(model, windows).perplexity:.3f}"
    )
    parameters = dict(model.named_parameters())
    for name in sorted(peaks, key=lambda n: -peaks[n][2])[: args.top]:
        _, x_at, _, y_at = peaks[name]
        weight = parameters[name + ".weight"]
        value = float(weight.data[y_at, x_at])
        weight.data[y_at, x_at] = 0.0
        ppl = perplexity(model, windows, show_progress=False).perplexity
        weight.data[y_at, x_at] = value
        print(f"zero {name}.weight[{y_at}, {x_at}] (value {value:.3f}): perplexity {ppl:.3f}")


if __name__ == "__main__":
    main()
