"""`rlhf pipeline`: SFT, then the reward model, then PPO, each from the previous output,
then a report of what RLHF did. `--stages` runs any chain: `sft,rm,grpo` (or rloo,
reinforce), `sft,grpo` with a reward function, `sft,dpo`.

Layout under the run's root (`output_dir`):

    pipeline.yaml      the multi-stage config as run (file + overrides)
    sft/ rm/ ppo/ ...  one directory per stage (final/, checkpoints/, metrics.jsonl, ...)
    timings.json       wall time of each stage
    report.md, report.json, report.png

Re-running skips the stages whose final/ exists and resumes the unfinished one from
its last checkpoint, so an interrupted pipeline (even kill -9) finishes as if it had
not stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import ConfigError, from_dict, load_yaml, parse_override, resolve_stage_dict, set_dotted, validate
from rlhf.stages import ON_POLICY, STAGES, config_class


def chain_defaults(data: dict[str, Any], root: str) -> list[str]:
    """Point each stage at the previous stage's output where the config leaves it open:
    the RM, DPO and every on-policy stage's policy start from SFT; PPO's value model and
    the on-policy stages' reward model come from the RM (unless a stage is scored by a
    reward function or server).
    Returns what was filled in, to be printed."""
    filled = []
    wanted = [("rm", ("model",), "sft"), ("ppo", ("value", "model"), "rm"), ("dpo", ("model",), "sft")]
    for stage in ON_POLICY:
        wanted += [(stage, ("policy", "model"), "sft"), (stage, ("reward", "model"), "rm")]
    for stage, path, source in wanted:
        section = data.get(stage)
        if not isinstance(section, dict):
            continue
        reward = section.get("reward") or {}
        if path[0] == "reward" and (reward.get("function") is not None or reward.get("url") is not None):
            continue  # scored by a function or a server: a reward model only where the config names one
        node = section
        for p in path:
            node = node.setdefault(p, {})
        if node.get("path") is None and node.get("arch") is None:
            node["path"] = f"{root}/{source}/final"
            filled.append(f"{stage}.{'.'.join(path)}.path = {node['path']}")
    return filled


def load_pipeline(config: str, overrides: list[str], world_size: int, stages: list[str] = ("sft", "rm", "ppo")):
    """The multi-stage dict with overrides applied, and the validated config of every stage
    it has a section for (checked against `world_size` for the `stages` that will run)."""
    data, where = load_yaml(config)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
        where[key] = f"command-line override {text!r}"
    missing = [s for s in stages if s not in data]
    if missing:
        raise ConfigError(f"{config} has no section for {', '.join(missing)} (it has: "
                          f"{', '.join(s for s in STAGES if s in data)}); choose the stages to run with --stages")
    root = str(data.get("output_dir", "runs/default"))
    filled = chain_defaults(data, root)
    cfgs = {}
    for stage in (s for s in STAGES if s in data):
        stage_dict, stage_where = resolve_stage_dict(data, where, stage, (), config)
        cfg = from_dict(config_class(stage), stage_dict, stage_where)
        validate(cfg, stage_where, world_size if stage in stages else None)
        cfgs[stage] = cfg
    return data, root, cfgs, filled


def finished(output_dir: str) -> bool:
    """Whether a stage's directory holds a finished run: final/ beside the config.yaml
    every run writes. A final/ alone is someone else's: refused, not skipped."""
    out = Path(output_dir)
    if (out / "final").is_dir() and not (out / "config.yaml").is_file():
        raise ConfigError(f"output_dir {out} holds final/ but no config.yaml: it is not an rlhf run directory; "
                          "choose a new output_dir")
    return (out / "final").is_dir()


def run_pipeline(config: str, overrides: list[str], stages: list[str], args: argparse.Namespace) -> int:
    from launch.common import EXIT_PREEMPTED
    from rlhf.cli import launch_stage, planned_world_size, stage_command

    data, root, cfgs, filled = load_pipeline(config, overrides, planned_world_size(args), stages)
    root_dir = Path(root)
    resolved = root_dir / "pipeline.yaml"
    done = {stage: finished(cfgs[stage].output_dir) for stage in stages}  # refuses foreign directories first
    if args.dry_run:  # every config is valid; show the commands, write nothing
        for stage in stages:
            print("$ " + " ".join(stage_command(stage, str(resolved), [], args)[0]))
        return 0
    root_dir.mkdir(parents=True, exist_ok=True)
    resolved.write_text(yaml.safe_dump(data, sort_keys=False))
    for line in filled:
        print(f"[pipeline] {line} (from the previous stage)")
    timings_path = root_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for stage in stages:
        if done[stage]:
            print(f"[pipeline] {stage}: finished before, skipped ({cfgs[stage].output_dir}/final)")
            continue
        print(f"[pipeline] {stage}: starting", flush=True)
        t0 = time.time()
        rc = launch_stage(stage, str(resolved), [], args)
        timings[stage] = timings.get(stage, 0.0) + time.time() - t0  # a resumed stage adds up its runs
        timings_path.write_text(json.dumps(timings, indent=1))
        if rc != 0:
            what = "stopped on request, with a checkpoint" if rc == EXIT_PREEMPTED else "failed"
            print(f"[pipeline] {stage} {what} (exit {rc}); re-run the same command to resume it")
            return rc
    if all(finished(cfgs[s].output_dir) for s in stages):
        from rlhf.report import write_report

        write_report(root_dir, cfgs, timings)
    return 0
