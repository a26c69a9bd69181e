"""kill -9 at random moments, some in the middle of a checkpoint write, in every stage; then
the same command again. Every resume must finish, no checkpoint directory may ever be
half-written or unreadable, and the pipeline so interrupted must end with exactly the
report of an uninterrupted one.

    python benchmarks/kill_resume.py [--kills 10] [--stages sft,rm,ppo] [--num-procs 1]
                                     [--seed 0] [--work runs/kill_resume]
                                     [--out benchmarks/results/kill_resume.json]

It runs `rlhf pipeline configs/quickstart.yaml` (a checkpoint every few steps) once without
interruption, then again, killing its whole process group with SIGKILL (no handler runs:
as when a node dies) `--kills` times while each stage runs: every other kill as soon as a
checkpoint's temporary directory appears (a write in progress), the others at a random
moment once the stage is training. After each kill, every checkpoint of every stage is
opened and read (`check_checkpoints`). Writes a JSON record of every kill and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "rm", "ppo")
# Checkpoints often, so that kills land in writes; the math is the same either way.
OVERRIDES = ["sft.checkpoint.every=5", "rm.checkpoint.every=5", "ppo.checkpoint.every=2", "logging.progress_bar=false"]


def check_checkpoints(stage_dir: Path) -> int:
    """Open every finished checkpoint under `stage_dir`: its trainer state names its step,
    and every file DeepSpeed and the trainer wrote loads. Returns how many were checked;
    raises AssertionError naming the first bad one."""
    import torch

    root = stage_dir / "checkpoints"
    found = sorted(p for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []
    for ckpt in found:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == int(ckpt.name[5:]), f"{ckpt}: trainer state says step {state['step']}"
        files = [p for p in ckpt.rglob("*.pt") if "universal" not in p.parts]
        assert any(p.name.endswith("model_states.pt") for p in files), f"{ckpt}: no model states"
        assert len([p for p in files if p.name.startswith("rank")]) == state["world_size"], f"{ckpt}: rank files"
        for f in files:
            torch.load(f, map_location="cpu", weights_only=False)
    return len(found)


def writing(stage_dir: Path) -> bool:
    """Whether a checkpoint of the stage is being written (its temporary directory exists)."""
    root = stage_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir())


def finished(stage_dir: Path) -> int:
    """How many finished checkpoints the stage has."""
    root = stage_dir / "checkpoints"
    return sum(p.name.startswith("step-") for p in root.iterdir()) if root.is_dir() else 0


def progress(stage_dir: Path) -> int:
    """Lines in the stage's metrics.jsonl: grows as the stage trains."""
    path = stage_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_once(cmd: list[str], env: dict[str, str], stage_dir: Path, mode: str, rng: random.Random,
              max_delay: float = 2.0, timeout: float = 900) -> dict | None:
    """Start `cmd` in a process group of its own and SIGKILL the group while `stage_dir`'s
    stage runs: with mode "write" as soon as a checkpoint write is seen (one at least
    finished before it), with "random" a
    random time (up to `max_delay` s) after the stage has logged something new. Returns
    what happened, or None when the command ended first (then its exit code must be 0)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            start_new_session=True)
    start, t0 = progress(stage_dir), time.time()
    try:
        while proc.poll() is None and progress(stage_dir) <= start:
            assert time.time() - t0 < timeout, "no progress"
            time.sleep(0.01)
        if mode == "write":  # a write while an earlier checkpoint exists, which must survive it
            while proc.poll() is None and not (writing(stage_dir) and finished(stage_dir)):
                assert time.time() - t0 < timeout, "no checkpoint write"
                time.sleep(0.001)
        else:
            deadline = time.time() + rng.uniform(0, max_delay)
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
        if proc.poll() is not None:
            assert proc.returncode == 0, f"{cmd} failed with exit {proc.returncode}"
            return None
        during_write = writing(stage_dir)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"mode": mode, "during_write": during_write, "after_s": round(time.time() - t0, 2),
            "checkpoints_checked": check_checkpoints(stage_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10, help="kills in each stage")
    p.add_argument("--stages", default="sft,rm,ppo")
    p.add_argument("--num-procs", type=int, default=1, help="ranks (CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--work", default="runs/kill_resume")
    p.add_argument("--out", default="benchmarks/results/kill_resume.json")
    args = p.parse_args()
    work = (ROOT / args.work).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RLHF_CACHE": str(work / "cache")}

    def pipeline(root: Path) -> list[str]:
        cmd = [sys.executable, "-m", "rlhf.cli", "pipeline", str(ROOT / "configs" / "quickstart.yaml"),
               f"output_dir={root}", *OVERRIDES]
        return cmd + (["--num-procs", str(args.num_procs)] if args.num_procs > 1 else [])

    t0 = time.time()
    reference = work / "reference"
    if not (reference / "report.json").exists():
        subprocess.run(pipeline(reference), env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    reference_s = time.time() - t0

    root, rng, kills = work / "killed", random.Random(args.seed), []
    for stage in args.stages.split(","):
        for k in range(args.kills):
            got = kill_once(pipeline(root), env, root / stage, "write" if k % 2 == 0 else "random", rng)
            if got is None:
                break  # the pipeline finished before this kill
            kills.append({"stage": stage, **got})
            print(json.dumps(kills[-1]), flush=True)
    final = subprocess.run(pipeline(root), env=env, cwd=ROOT, capture_output=True, text=True)
    same = final.returncode == 0 and all(
        json.loads((root / "report.json").read_text())[s] == json.loads((reference / "report.json").read_text())[s]
        for s in STAGES)  # what each stage achieved (wall times aside)
    result = {
        "command": " ".join(sys.argv), "num_procs": args.num_procs, "kills": kills,
        "kills_per_stage": {s: sum(k["stage"] == s for k in kills) for s in STAGES},
        "kills_during_a_write": sum(k["during_write"] for k in kills),
        "checkpoints_checked": sum(k["checkpoints_checked"] for k in kills),
        "final_exit_code": final.returncode, "report_equals_uninterrupted": same,
        "reference_s": round(reference_s, 1), "total_s": round(time.time() - t0, 1),
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=1))
    if not same:
        sys.exit(f"the interrupted pipeline did not end like the uninterrupted one (exit {final.returncode})\n"
                 + final.stdout[-2000:] + final.stderr[-2000:])


if __name__ == "__main__":
    main()
