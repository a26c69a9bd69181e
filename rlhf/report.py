"""The pipeline's report: what each stage achieved, as a table, report.md, report.json and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.stages import ON_POLICY, STAGES
from rlhf.evaluate import Sampling, compare_policies
from rlhf.metrics import read_metrics
from rlhf.model_source import model_dir


def held_out_prompts(cfg, stage_index: int = 2) -> tuple[list[str], list[list[int]]]:
    """A stage's evaluation prompts (its training prompts if it has none): texts and token
    ids, as the trainer tokenized them. PPO's prompts (stage_index 2), or the prompts of
    DPO's pairs (1)."""
    from rlhf.data.formats import tokenize_prompts
    from rlhf.data.sources import load_rows
    from rlhf.models import load_tokenizer

    train, ev = load_rows(cfg.data, stage_index)
    tok = load_tokenizer(cfg.tokenizer, cfg.primary_model())
    examples, _ = tokenize_prompts(ev or train, tok, cfg.data)
    return [e["prompt"] for e in examples], [e["prompt_ids"] for e in examples]


def finished(cfgs: dict[str, Any], stage: str) -> bool:
    return stage in cfgs and (Path(cfgs[stage].output_dir) / "final").is_dir()


def build_report(root: Path, cfgs: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """One section per finished stage (sft, rm, the on-policy stages, dpo), their times, samples."""
    rep: dict[str, Any] = {}
    if finished(cfgs, "sft"):
        sft = final_metrics(cfgs["sft"])
        rep["sft"] = {"eval_perplexity": sft.get("eval/perplexity"), "eval_loss": sft.get("eval/loss")}
    if finished(cfgs, "rm"):
        rm = final_metrics(cfgs["rm"])
        rep["rm"] = {"eval_accuracy": rm.get("eval/accuracy"), "eval_margin": rm.get("eval/margin")}
    samples = None
    for stage in ON_POLICY:
        if finished(cfgs, stage):
            rep[stage], stage_samples = onpolicy_section(cfgs[stage])
            if stage == "ppo":
                samples = stage_samples  # at the top level, as before the other on-policy stages
            else:
                rep[stage]["samples"] = stage_samples
    if finished(cfgs, "dpo"):
        rep["dpo"] = dpo_section(cfgs["dpo"])
    rep["time_s"] = {s: round(timings.get(s, 0.0), 1) for s in STAGES if s in rep}
    if samples is not None:
        rep["samples"] = samples
    return rep


def final_metrics(cfg) -> dict[str, Any]:
    return json.loads((Path(cfg.output_dir) / "final" / "final_metrics.json").read_text())


def task_gold(cfg):
    if cfg.task is None:
        return None
    from rlhf.task import gold_function

    return gold_function(cfg.task)


def onpolicy_section(cfg) -> tuple[dict[str, Any], list[dict]]:
    """An on-policy stage's policy against its start (the SFT policy) on the held-out
    prompts: gold reward (built-in task), win rate, KL, and the reward model's scores
    when the stage had one. PPO's section keeps its older names too (`gold_reward_ppo`,
    `rm_score_ppo`)."""
    r = cfg.rollout
    texts, ids = held_out_prompts(cfg)
    sampling = Sampling(max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, temperature=r.temperature,
                        top_k=r.top_k, top_p=r.top_p, seed=cfg.seed)
    reward_dir = model_dir(cfg.reward.model) if cfg.reward.has_model() else None
    cmp = compare_policies(Path(cfg.output_dir) / "final", model_dir(cfg.policy.model), reward_dir, texts, sampling,
                           gold=task_gold(cfg), prompt_ids=ids)
    section = {
        "prompts": cmp["prompts"],
        "gold_reward_sft": cmp.get("gold_baseline"),
        "gold_reward_policy": cmp.get("gold_policy"),
        "rm_score_sft": cmp.get("score_baseline"),
        "rm_score_policy": cmp.get("score_policy"),
        "win_rate": cmp.get("win_rate"),
        "win_rate_rm": cmp.get("win_rate_score"),
        "kl": cmp["kl"],
        "response_length": cmp["response_length_policy"],
        "eos_rate": cmp["eos_rate_policy"],
    }
    if cfg.stage == "ppo":
        section.update(gold_reward_ppo=section["gold_reward_policy"], rm_score_ppo=section["rm_score_policy"])
    return section, cmp["samples"]


def dpo_section(dpo_cfg) -> dict[str, Any]:
    """The DPO policy against its start (the SFT policy) on the held-out pairs' prompts,
    each once: gold reward (built-in task), win rate, KL; no reward model is involved."""
    s = dpo_cfg.eval_sampling
    texts, ids = held_out_prompts(dpo_cfg, 1)
    first: dict[str, int] = {}  # each prompt once
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    once = list(first.values())
    cmp = compare_policies(Path(dpo_cfg.output_dir) / "final", model_dir(dpo_cfg.model), None,
                           [texts[i] for i in once],
                           Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                    top_p=s.top_p, seed=dpo_cfg.seed), gold=task_gold(dpo_cfg),
                           prompt_ids=[ids[i] for i in once])
    final = final_metrics(dpo_cfg)
    return {
        "eval_reward_accuracy": final.get("eval/reward_accuracy"),
        "eval_margin": final.get("eval/margin"),
        "prompts": cmp["prompts"],
        "gold_reward_sft": cmp.get("gold_baseline"),
        "gold_reward_policy": cmp.get("gold_policy"),
        "win_rate": cmp.get("win_rate"),
        "kl": cmp["kl"],
        "response_length": cmp["response_length_policy"],
        "eos_rate": cmp["eos_rate_policy"],
        "samples": cmp["samples"],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_table(rep: dict[str, Any]) -> str:
    rows = []
    if "sft" in rep:
        rows.append(("SFT eval perplexity", rep["sft"]["eval_perplexity"]))
    if "rm" in rep:
        rows.append(("RM held-out accuracy", rep["rm"]["eval_accuracy"]))
    if "ppo" in rep:
        p = rep["ppo"]
        rows += [
            ("gold reward: SFT policy", p["gold_reward_sft"]),
            ("gold reward: PPO policy", p["gold_reward_ppo"]),
            ("RM score: SFT policy", p["rm_score_sft"]),
            ("RM score: PPO policy", p["rm_score_ppo"]),
            ("PPO win rate over SFT (gold)", p["win_rate"]),
            ("PPO win rate over SFT (RM)", p["win_rate_rm"]),
            ("KL(PPO || SFT) per response", p["kl"]),
        ]
    for stage in ON_POLICY:
        if stage == "ppo" or stage not in rep:
            continue
        p, name = rep[stage], stage.upper()
        rows += [(f"{name}: gold reward of SFT policy", p["gold_reward_sft"]),
                 (f"{name}: gold reward of {name} policy", p["gold_reward_policy"]),
                 (f"{name} win rate over SFT (gold)", p["win_rate"]),
                 (f"KL({name} || SFT) per response", p["kl"])]
    if "dpo" in rep:
        d = rep["dpo"]
        rows += [
            ("DPO held-out reward accuracy", d["eval_reward_accuracy"]),
            ("DPO: gold reward of SFT policy", d["gold_reward_sft"]),
            ("DPO: gold reward of DPO policy", d["gold_reward_policy"]),
            ("DPO win rate over SFT (gold)", d["win_rate"]),
            ("KL(DPO || SFT) per response", d["kl"]),
        ]
    stages = list(rep["time_s"])
    rows.append((f"time: {' / '.join(s.upper() for s in stages)} (s)",
                 " / ".join(_fmt(rep["time_s"][s]) for s in stages)))
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
              ("ppo", ["ppo/kl", "eval/kl"], "PPO: KL to the reference"),
              *[(s, [f"{s}/gold_reward", "eval/gold_reward"], f"{s.upper()}: gold reward") for s in ON_POLICY
                if s != "ppo"],
              ("dpo", ["train/reward_accuracy", "eval/reward_accuracy"], "DPO: reward accuracy"),
              ("dpo", ["eval/gold_reward"], "DPO: gold reward")]
    panels = [p for p in panels if finished(cfgs, p[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2), squeeze=False)
    for ax, (stage, keys, title) in zip(axes[0], panels):
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
    text = f"# RLHF pipeline report: {root}\n\n{table}\n\n"
    shown = [("ppo", rep.get("samples"))] + [(s, rep.get(s, {}).get("samples")) for s in (*ON_POLICY, "dpo")
                                             if s != "ppo"]
    for stage, samples in shown:
        if samples is not None:
            lines = "\n".join(f"- prompt: {s['prompt'].strip()!r}\n  - SFT: {s['baseline']!r}\n  - "
                              f"{stage.upper()}: {s['policy']!r}" for s in samples)
            text += f"## {stage.upper()} samples ({rep[stage]['prompts']} held-out prompts)\n\n{lines}\n\n"
    (root / "report.md").write_text(text + "![curves](report.png)\n")
    plot_report(root, cfgs, root / "report.png")
    print(f"\n{table}\n\nreport: {root / 'report.md'}", flush=True)
    return rep
