"""Bare-torch training speed of a causal LM right now: fwd + bwd + AdamW on 16 x 32 tokens, fp32.

On a shared machine, time this next to a pipeline run: the run's time scaled by
(this speed now / this speed on a quiet machine) estimates the run's quiet time.

    python benchmarks/bare_train_speed.py ~/.cache/rlhf/models/SmolLM2-135M-Instruct.Q4_1-*/ --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="a Hugging Face model directory")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randint(100, model.config.vocab_size, (16, 32))

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up, not timed
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = time.perf_counter() - t0
    print(f"threads={torch.get_num_threads()} tokens/s={x.numel() * args.steps / dt:.1f} "
          f"({args.steps} steps, {dt:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
