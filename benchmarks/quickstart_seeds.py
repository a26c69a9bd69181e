"""A pipeline config on several seeds: does it reach its goals every time?

For each seed, runs `rlhf pipeline CONFIG` with that training seed and that task seed
(new data, new initial weights; for the quickstart also a new tokenizer), then collects
the report. Goals on 2 CPU cores, by config:

- quickstart.yaml: RM held-out accuracy >= 0.95 against the gold labels, PPO win rate
  over SFT >= 0.8 by gold reward, under 5 minutes of training time; with
  `--stages sft,dpo`: DPO's win rate over SFT >= 0.8 by gold reward, same time limit;
- smollm2.yaml (SmolLM2-135M-Instruct; `python -m rlhf.download smollm2` first): RM
  accuracy >= 0.9, win rate >= 0.7, at most 20 minutes of training time.

    python benchmarks/quickstart_seeds.py --seeds 1 2 3 --out benchmarks/results/quickstart_seeds.json
    python benchmarks/quickstart_seeds.py --stages sft,dpo --seeds 0 1 2 --out benchmarks/results/quickstart_seeds_dpo.json
    python benchmarks/quickstart_seeds.py --config configs/smollm2.yaml --seeds 1 2 3 \
        --out benchmarks/results/smollm2_seeds.json
    python benchmarks/quickstart_seeds.py --stages sft,rm,grpo --seeds 0 1 2 --out benchmarks/results/quickstart_seeds_grpo.json
    python benchmarks/quickstart_seeds.py --stages sft,grpo --seeds 0 1 2 --out benchmarks/results/quickstart_seeds_grpo_fn.json \
        grpo.reward.function=rlhf.task:gold_rewards grpo.reward.model.path=null
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# config stem -> (min RM accuracy, min win rate, max training seconds)
GOALS = {"quickstart": (0.95, 0.8, 300), "smollm2": (0.9, 0.7, 1200)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--root", default=None, help="run directories (default runs/seeds for the quickstart, "
                   "runs/seeds-STEM for another config)")
    p.add_argument("--out", default=None)
    p.add_argument("--stages", default="sft,rm,ppo",
                   help="the pipeline's --stages: sft,rm,ppo, sft,dpo, sft,rm,grpo (rloo, reinforce), sft,grpo")
    p.add_argument("overrides", nargs="*", help="key=value for the pipeline, e.g. grpo.reward.function=...")
    args = p.parse_args()
    stem = Path(args.config).stem
    args.root = args.root or ("runs/seeds" if stem == "quickstart" else f"runs/seeds-{stem}")
    if args.stages == "sft,dpo":
        return dpo_seeds(args)
    last = args.stages.split(",")[-1]
    if last != "ppo":
        return onpolicy_seeds(args, last)
    min_acc, min_win, max_time = GOALS.get(stem, GOALS["quickstart"])
    rows = []
    for seed in args.seeds:
        out = Path(args.root) / f"seed-{seed}"
        rep = run_pipeline(args.config, out, seed, args.overrides)
        row = {"seed": seed, "rm_accuracy": rep["rm"]["eval_accuracy"], "win_rate": rep["ppo"]["win_rate"],
               "gold_sft": rep["ppo"]["gold_reward_sft"], "gold_ppo": rep["ppo"]["gold_reward_ppo"],
               "kl": rep["ppo"]["kl"], "prompts": rep["ppo"]["prompts"], "sft_perplexity": rep["sft"]["eval_perplexity"],
               "train_time_s": sum(rep["time_s"].values()), **{f"time_{k}": v for k, v in rep["time_s"].items()}}
        row["goals_met"] = (row["rm_accuracy"] >= min_acc and row["win_rate"] >= min_win
                            and row["train_time_s"] <= max_time)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| seed | RM acc | win rate | gold SFT -> PPO | KL | SFT ppl | time (s) | goals |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['rm_accuracy']:.3f} | {r['win_rate']:.3f} | {r['gold_sft']:.3f} -> "
              f"{r['gold_ppo']:.3f} | {r['kl']:.2f} | {r['sft_perplexity']:.2f} | {r['train_time_s']:.0f} | "
              f"{'yes' if r['goals_met'] else 'NO'} |")
    save_rows(rows, args.out)


def onpolicy_seeds(args: argparse.Namespace, stage: str) -> None:
    """GRPO, RLOO or REINFORCE++ after SFT (and the RM, when --stages has it): the policy's
    win rate over SFT by gold reward >= 0.8 and a higher gold reward."""
    rows = []
    for seed in args.seeds:
        out = Path(args.root) / f"seed-{seed}"
        rep = run_pipeline(args.config, out, seed, ["--stages", args.stages, *args.overrides])
        d = rep[stage]
        row = {"seed": seed, "stages": args.stages, "overrides": args.overrides,
               "rm_accuracy": rep.get("rm", {}).get("eval_accuracy"), "win_rate": d["win_rate"],
               "gold_sft": d["gold_reward_sft"], "gold_policy": d["gold_reward_policy"], "kl": d["kl"],
               "train_time_s": sum(rep["time_s"].values()), **{f"time_{k}": v for k, v in rep["time_s"].items()}}
        row["goals_met"] = row["win_rate"] >= 0.8 and row["gold_policy"] > row["gold_sft"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = stage.upper()
    print(f"| seed | RM acc | win rate | gold SFT -> {name} | KL | time {name} (s) | goals |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rm = f"{r['rm_accuracy']:.3f}" if r["rm_accuracy"] is not None else "-"
        print(f"| {r['seed']} | {rm} | {r['win_rate']:.3f} | {r['gold_sft']:.3f} -> {r['gold_policy']:.3f} | "
              f"{r['kl']:.2f} | {r[f'time_{stage}']:.0f} | {'yes' if r['goals_met'] else 'NO'} |")
    save_rows(rows, args.out)


def dpo_seeds(args: argparse.Namespace) -> None:
    rows = []
    for seed in args.seeds:
        out = Path(args.root) / f"seed-{seed}"
        rep = run_pipeline(args.config, out, seed, ["--stages", "sft,dpo", *args.overrides])
        d = rep["dpo"]
        row = {"seed": seed, "reward_accuracy": d["eval_reward_accuracy"], "win_rate": d["win_rate"],
               "gold_sft": d["gold_reward_sft"], "gold_dpo": d["gold_reward_policy"], "kl": d["kl"],
               "prompts": d["prompts"], "sft_perplexity": rep["sft"]["eval_perplexity"],
               "train_time_s": sum(rep["time_s"].values()), **{f"time_{k}": v for k, v in rep["time_s"].items()}}
        row["goals_met"] = row["win_rate"] >= 0.8 and row["train_time_s"] < 300
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| seed | DPO reward acc | win rate | gold SFT -> DPO | KL | SFT ppl | SFT / DPO (s) | goals |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['reward_accuracy']:.3f} | {r['win_rate']:.3f} | {r['gold_sft']:.3f} -> "
              f"{r['gold_dpo']:.3f} | {r['kl']:.2f} | {r['sft_perplexity']:.2f} | {r['time_sft']:.0f} / "
              f"{r['time_dpo']:.0f} | {'yes' if r['goals_met'] else 'NO'} |")
    save_rows(rows, args.out)


def run_pipeline(config: str, out: Path, seed: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlhf.cli", "pipeline", config, f"output_dir={out}", f"seed={seed}",
           f"task.seed={seed}", "logging.progress_bar=false", *extra]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return json.loads((out / "report.json").read_text())


def save_rows(rows: list[dict], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
