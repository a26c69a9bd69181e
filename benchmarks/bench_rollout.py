"""ZeRO-3 rollouts: same tokens as ZeRO-0, at close to its speed.

Generates greedily from the same policy wrapped three ways and times each:
  zero0            plain data parallel (the reference);
  zero3            ZeRO-3 as the PPO trainer generates: parameters gathered once per
                   rollout batch (rlhf.rollout.generation_context);
  zero3-per-token  ZeRO-3 left to its per-module hooks, which fetch every layer's
                   shards for every generated token (what DeepSpeedExamples #718 hit).
Checks that all three give identical tokens. Run on one process, or on several ranks:

    python benchmarks/bench_rollout.py
    deepspeed --num_gpus 2 benchmarks/bench_rollout.py      # 2 ranks (CPU: gloo)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import model_arch, model_args, prepare  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    model_args(p, hidden=256, layers=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    from rlhf.backbone import Backbone
    from rlhf.config import DeepSpeedConfig, ModelConfig, OptimConfig, RolloutConfig, TokenizerConfig
    from rlhf.data.batching import collate_prompts
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rollout import generate

    bb = Backbone()
    work = Path(args.work) / f"rollout-h{args.hidden}-l{args.layers}"
    spec = bb.main_first(lambda: prepare(work, model_arch(args.hidden, args.layers, args.heads)), local=False)
    tok = load_tokenizer(TokenizerConfig(path=spec["tokenizer"]))
    prompts = [json.loads(x)["prompt"] for x in Path(spec["prompts_train"]).read_text().splitlines()]
    batch = collate_prompts([{"prompt_ids": tok(q)["input_ids"]} for q in prompts[:args.batch]], tok.pad_token_id)
    ids, mask = batch["input_ids"].to(bb.device), batch["attention_mask"].to(bb.device)
    # EOS suppressed: every row generates all new tokens, so every run does the same work
    rollout = RolloutConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    variants = {"zero0": 0, "zero3": 3, "zero3-per-token": 3}
    engines = {}
    for name, zero in variants.items():
        ds = DeepSpeedConfig(zero_stage=zero)
        with bb.model_init(ds):
            model = load_causal_lm(ModelConfig(path=spec["model"]), tok)
        engines[name] = bb.wrap(model, ds, OptimConfig(lr=1e-5))

    def run(name):
        # the per-token variant bypasses the gathering context: ZeRO-3's hooks fetch per module, per token
        zero = 0 if name == "zero3-per-token" else variants[name]
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(engines[name], ids, mask, rollout, tok, zero, greedy=True)
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out[0].cpu()

    # Rounds alternate the variants' order, so that drifts of a shared machine's speed
    # fall on all of them; the first round warms up and is not counted.
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens = {}
    names = list(variants)
    for r in range(args.repeats + 1):
        for name in names if r % 2 == 0 else names[::-1]:
            t, tokens[name] = run(name)
            if r:
                times[name].append(t)
    results = {k: statistics.median(v) for k, v in times.items()}
    same = all(torch.equal(tokens["zero0"], t) for t in tokens.values())
    ratio = results["zero3"] / results["zero0"]
    # per-round ratios too: each pair was timed back to back
    round_ratios = [a / b for a, b in zip(times["zero3"], times["zero0"])]
    summary = {"device": str(bb.device), "ranks": bb.world_size, "hidden": args.hidden, "layers": args.layers,
               "batch": args.batch, "new_tokens": args.new_tokens, "repeats": args.repeats, "seconds": results,
               "zero3_over_zero0": ratio, "zero3_over_zero0_per_round": round_ratios,
               "per_token_over_zero0": results["zero3-per-token"] / results["zero0"], "same_tokens": same}
    if bb.is_main:
        print("| variant | seconds per rollout batch | vs ZeRO-0 |\n|---|---|---|")
        for k, v in results.items():
            print(f"| {k} | {v:.3f} | {v / results['zero0']:.2f}x |")
        print(f"identical greedy tokens: {same}")
        print("RESULT " + json.dumps(summary), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(summary, indent=1))
    if not same:
        raise SystemExit("ZeRO-3 generation differs from ZeRO-0")


if __name__ == "__main__":
    main()
