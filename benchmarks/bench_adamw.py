"""torch AdamW step on the CPU: the foreach (multi-tensor) implementation rlhf used before
against the fused kernel it uses now (`Backbone.make_optimizer`), on the parameters of
random-init Llama-style models of two sizes, alternating, medians of the rounds:

    python benchmarks/bench_adamw.py --out benchmarks/results/adamw_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host, save  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    result = {"host": host(), "ms_per_step": {}}
    for hidden, layers in ((128, 2), (512, 8)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                             num_hidden_layers=layers, num_attention_heads=8))
        params = list(model.parameters())
        for q in params:
            q.grad = torch.randn_like(q) * 1e-3
        opts = {k: torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), **{k: True}) for k in ("foreach", "fused")}
        times: dict[str, list[float]] = {k: [] for k in opts}
        for r in range(args.rounds + 1):
            for k in opts if r % 2 == 0 else reversed(list(opts)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    opts[k].step()
                if r:
                    times[k].append((time.perf_counter() - t0) / args.steps * 1e3)
        name = f"hidden{hidden}-layers{layers} ({sum(q.numel() for q in params) / 1e6:.1f}M params)"
        med = {k: statistics.median(v) for k, v in times.items()}
        result["ms_per_step"][name] = med
        print(f"{name}: foreach {med['foreach']:.2f} ms, fused {med['fused']:.2f} ms, "
              f"{med['foreach'] / med['fused']:.2f}x", flush=True)
    save(result, args.out)


if __name__ == "__main__":
    main()
