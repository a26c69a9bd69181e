"""The pipeline's report: what each stage achieved, as a table, report.md, report.json and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.evaluate import Sampling, compare_policies
from rlhf.metrics import read_metrics
from rlhf.model_source import model_dir


def held_out_prompts(ppo_cfg) -> tuple[list[str], list[list[int]]]:
    """The PPO stage's evaluation prompts (its training prompts if it has none): texts and
    token ids, as the trainer tokenized them."""
    from rlhf.data.formats import tokenize_prompts
    from rlhf.data.sources import load_rows
    from rlhf.models import load_tokenizer

    train, ev = load_rows(ppo_cfg.data, 2)
    tok = load_tokenizer(ppo_cfg.tokenizer, ppo_cfg.primary_model())
    examples, _ = tokenize_prompts(ev or train, tok, ppo_cfg.data)
    return [e["prompt"] for e in examples], [e["prompt_ids"] for e in examples]


def build_report(root: Path, cfgs: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    sft = json.loads((Path(cfgs["sft"].output_dir) / "final" / "final_metrics.json").read_text())
    rm = json.loads((Path(cfgs["rm"].output_dir) / "final" / "final_metrics.json").read_text())
    ppo_cfg = cfgs["ppo"]
    gold = None
    if ppo_cfg.task is not None:
        from rlhf.task import gold_function

        gold = gold_function(ppo_cfg.task)
    r = ppo_cfg.rollout
    texts, ids = held_out_prompts(ppo_cfg)
    sampling = Sampling(max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, temperature=r.temperature,
                        top_k=r.top_k, top_p=r.top_p, seed=ppo_cfg.seed)
    cmp = compare_policies(Path(ppo_cfg.output_dir) / "final", model_dir(ppo_cfg.policy.model),
                           model_dir(ppo_cfg.reward.model), texts, sampling, gold=gold, prompt_ids=ids)
    return {
        "sft": {"eval_perplexity": sft.get("eval/perplexity"), "eval_loss": sft.get("eval/loss")},
        "rm": {"eval_accuracy": rm.get("eval/accuracy"), "eval_margin": rm.get("eval/margin")},
        "ppo": {
            "prompts": cmp["prompts"],
            "gold_reward_sft": cmp.get("gold_baseline"),
            "gold_reward_ppo": cmp.get("gold_policy"),
            "rm_score_sft": cmp["score_baseline"],
            "rm_score_ppo": cmp["score_policy"],
            "win_rate": cmp.get("win_rate"),
            "win_rate_rm": cmp["win_rate_score"],
            "kl": cmp["kl"],
            "response_length": cmp["response_length_policy"],
            "eos_rate": cmp["eos_rate_policy"],
        },
        "time_s": {s: round(timings.get(s, 0.0), 1) for s in ("sft", "rm", "ppo")},
        "samples": cmp["samples"],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_table(rep: dict[str, Any]) -> str:
    p = rep["ppo"]
    rows = [
        ("SFT eval perplexity", rep["sft"]["eval_perplexity"]),
        ("RM held-out accuracy", rep["rm"]["eval_accuracy"]),
        ("gold reward: SFT policy", p["gold_reward_sft"]),
        ("gold reward: PPO policy", p["gold_reward_ppo"]),
        ("RM score: SFT policy", p["rm_score_sft"]),
        ("RM score: PPO policy", p["rm_score_ppo"]),
        ("PPO win rate over SFT (gold)", p["win_rate"]),
        ("PPO win rate over SFT (RM)", p["win_rate_rm"]),
        ("KL(PPO || SFT) per response", p["kl"]),
        ("time: SFT / RM / PPO (s)", " / ".join(_fmt(rep["time_s"][s]) for s in ("sft", "rm", "ppo"))),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def plot_report(root: Path, cfgs: dict[str, Any], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sft", ["train/loss", "eval/loss"], "SFT loss"), ("rm", ["eval/accuracy"], "RM held-out accuracy"),
              ("ppo", ["ppo/score", "eval/score"], "PPO: reward-model score"),
              ("ppo", ["ppo/gold_reward", "eval/gold_reward"], "PPO: gold reward"),
              ("ppo", ["ppo/kl", "eval/kl"], "PPO: KL to the reference")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2))
    for ax, (stage, keys, title) in zip(axes, panels):
        rows = read_metrics(Path(cfgs[stage].output_dir) / "metrics.jsonl")
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write_report(root: Path, cfgs: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    rep = build_report(root, cfgs, timings)
    table = report_table(rep)
    (root / "report.json").write_text(json.dumps(rep, indent=1))
    samples = "\n".join(f"- prompt: {s['prompt'].strip()!r}\n  - SFT: {s['baseline']!r}\n  - PPO: {s['policy']!r}"
                        for s in rep["samples"])
    (root / "report.md").write_text(f"# RLHF pipeline report: {root}\n\n{table}\n\n"
                                    f"Held-out prompts: {rep['ppo']['prompts']}.\n\n## Samples\n\n{samples}\n\n"
                                    "![curves](report.png)\n")
    plot_report(root, cfgs, root / "report.png")
    print(f"\n{table}\n\nreport: {root / 'report.md'}", flush=True)
    return rep
