"""No lost work: checkpoints by time and on SIGTERM/SIGUSR1 (the step in progress ends,
every rank checkpoints, the run exits 75, and the same command again resumes exactly),
rotation that never holds more than keep_last + 1, and a directory that is not ours
refused, not skipped."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_ARCHS, subprocess_env
from rlhf.trainers.base import Preempted, RunDirError
from rlhf.trainers.ppo import PPOTrainer
from rlhf.trainers.reward import RewardTrainer
from rlhf.trainers.sft import SFTTrainer
from test_hangs import run_jobs
from test_ppo import models, ppo_cfg  # noqa: F401 (models: a fixture)
from test_reward import policy_dir, rm_cfg  # noqa: F401 (policy_dir: a fixture)
from test_sft import make_cfg, sft_data  # noqa: F401 (sft_data: a fixture)


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def stage_run(stage, out, tmp_path, sft_data, tokenizer_dir, policy_dir, task_dir, models, *extra):
    """(trainer class, config) of a short run of `stage` writing to `out`."""
    if stage == "sft":
        return SFTTrainer, make_cfg(out, sft_data, tokenizer_dir, "train.max_steps=5", *extra)
    # Short evaluation sets: evaluation would be most of these runs' time.
    few = tmp_path / f"{stage}_eval.jsonl"
    source = task_dir / ("pairs_eval.jsonl" if stage == "rm" else "prompts_eval.jsonl")
    few.write_text("".join(source.read_text().splitlines(True)[:16]))
    if stage == "rm":
        return RewardTrainer, rm_cfg(out / "out", policy_dir, task_dir, "train.max_steps=5", f"data.eval.path={few}",
                                     *extra)
    return PPOTrainer, ppo_cfg(out / "out", models, task_dir, "train.max_steps=4", "ppo.epochs=1",
                               "ppo.ema_decay=0.9", "ppo.kl_controller=adaptive", f"data.eval.path={few}", *extra)


@pytest.mark.parametrize("stage,sig", [("sft", signal.SIGTERM), ("rm", signal.SIGUSR1), ("ppo", signal.SIGTERM)],
                         ids=["sft", "rm", "ppo"])
def test_a_stop_signal_ends_the_step_checkpoints_and_the_same_run_again_finishes_identically(
        stage, sig, tmp_path, sft_data, tokenizer_dir, policy_dir, task_dir, models, backbone, monkeypatch):
    cls, cfg = stage_run(stage, tmp_path / "full", tmp_path, sft_data, tokenizer_dir, policy_dir, task_dir, models)
    cls(cfg, backbone).fit()
    cls, cfg = stage_run(stage, tmp_path / "cut", tmp_path, sft_data, tokenizer_dir, policy_dir, task_dir, models)
    real = cls.train_step

    def signal_in_step_3(self, micro_batches):
        if self.step == 2:
            os.kill(os.getpid(), sig)  # the handler runs at once; the step goes on
        return real(self, micro_batches)

    monkeypatch.setattr(cls, "train_step", signal_in_step_3)
    with pytest.raises(Preempted):
        cls(cfg, backbone).fit()
    monkeypatch.setattr(cls, "train_step", real)
    out = tmp_path / "cut" / "out"
    assert checkpoints(out) == ["step-00000003"] and not (out / "final").exists()
    assert signal.getsignal(sig) is signal.SIG_DFL  # fit put the default handler back
    cls(cfg, backbone).fit()
    full = tmp_path / "full" / "out"
    a, b = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()], \
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert a == [{**r, **{k: v for k, v in x.items() if k.endswith("_s") or k.endswith("_per_s")}}
                 for r, x in zip(b, a)]  # the same log, timings aside
    for sub in ("", "value", "ema") if stage == "ppo" else ("",):
        wa, wb = load_file(full / "final" / sub / "model.safetensors"), load_file(out / "final" / sub / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (stage, sub)


def test_checkpoints_by_time_and_rotation_keeps_at_most_keep_last_plus_one(tmp_path, sft_data, tokenizer_dir,
                                                                          backbone):
    out = tmp_path / "out"
    (out / "checkpoints" / ".tmp-step-00000099").mkdir(parents=True)  # a save killed in an earlier run
    (out / "checkpoints" / ".deleting-step-00000098").mkdir()  # and a deletion
    (out / "config.yaml").write_text("left by the earlier run\n")
    seen, done = [], threading.Event()

    def watch():  # what the checkpoint directory holds, as often as we can look
        while not done.is_set():
            seen.append(len(os.listdir(out / "checkpoints")))
            time.sleep(0.001)  # and let the training thread run

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # every_minutes that is always due: a checkpoint after every step, by the clock
        SFTTrainer(make_cfg(tmp_path, sft_data, tokenizer_dir, "checkpoint.every_minutes=1e-9",
                            "checkpoint.keep_last=1"), backbone).fit()
    finally:
        done.set()
        watcher.join()
    assert len(seen) > 100 and max(seen) == 2, max(seen)  # keep_last + 1, the one being written included
    assert checkpoints(out) == ["step-00000006"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in r for r in rows) == 6
    # no time interval and no step interval: the final checkpoint only
    SFTTrainer(make_cfg(tmp_path / "b", sft_data, tokenizer_dir, "checkpoint.every_minutes=0"), backbone).fit()
    assert checkpoints(tmp_path / "b" / "out") == ["step-00000006"]


def test_a_kill_while_deleting_an_old_checkpoint_leaves_no_half_deleted_step_dir(tmp_path, monkeypatch):
    """Rotation renames a checkpoint out of the `step-*` names before deleting its files:
    here the deletion dies after one file (as under kill -9)."""
    import shutil

    from rlhf import backbone as bb

    old = tmp_path / "step-00000003"
    (old / "policy").mkdir(parents=True)
    for name in ("trainer_state.json", "policy/mp_rank_00_model_states.pt", "rank0.pt"):
        (old / name).write_text("x")

    def killed(path, ignore_errors=False):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[-1].unlink()
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        bb.remove_dir(old)
    assert bb.list_checkpoints(tmp_path) == []  # not a finished checkpoint any more
    assert [p.name for p in tmp_path.iterdir()] == [".deleting-step-00000003"]


def test_a_final_dir_without_our_config_is_refused_not_skipped(tmp_path, sft_data, tokenizer_dir, backbone):
    (tmp_path / "out" / "final").mkdir(parents=True)
    (tmp_path / "out" / "final" / "weights.bin").write_text("someone else's")
    with pytest.raises(RunDirError, match="not an rlhf run directory"):
        SFTTrainer(make_cfg(tmp_path, sft_data, tokenizer_dir), backbone).fit()
    # the pipeline refuses it before running any stage (here the first: nothing is written)
    root = tmp_path / "run"
    (root / "sft" / "final").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", str(ROOT / "configs" / "quickstart.yaml"),
                           f"output_dir={root}"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds final/ but no config.yaml" in proc.stderr, proc.stdout + proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["sft"]
    assert (tmp_path / "out" / "final" / "weights.bin").read_text() == "someone else's"


# ---------------------------------------------------------------------- across ranks and launchers

def sft_overrides(out, sft_data, tokenizer_dir, zero, steps):
    train, ev = sft_data
    return [f"output_dir={out}", f"tokenizer.path={tokenizer_dir}", f"data.path={train}", f"data.eval.path={ev}",
            "data.max_length=32", "train.global_batch_size=8", "train.micro_batch_size=4", f"train.max_steps={steps}",
            "optim.lr=3e-3", "optim.scheduler=linear", "model.dropout=0.0", "logging.progress_bar=false",
            f"model.arch={json.dumps(TINY_ARCHS['llama'])}", f"deepspeed.zero_stage={zero}", "checkpoint.every=2",
            "checkpoint.keep_last=100"]


LONG = 40  # steps of the run that is stopped by signals: long enough to be stopped mid-way


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, sft_data, tokenizer_dir):
    """Uninterrupted 2-rank SFT runs (ZeRO 0, 2, 3), a checkpoint every 2 steps kept."""
    tmp = tmp_path_factory.mktemp("two_rank_runs")
    run_jobs([["sft", sft_overrides(tmp / f"zero{z}", sft_data, tokenizer_dir, z, LONG if z == 2 else 4)]
              for z in (0, 2, 3)], tmp)
    return tmp


def train_losses(out):
    return [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_a_two_rank_checkpoint_resumes_on_one_rank(zero, two_rank_runs, tmp_path, sft_data, tokenizer_dir,
                                                   backbone, capsys):
    import shutil

    from rlhf.config import SFTConfig, load_stage_config

    src, out = two_rank_runs / f"zero{zero}", tmp_path / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("final"))
    for ckpt in (out / "checkpoints").iterdir():
        if ckpt.name != "step-00000002":
            shutil.rmtree(ckpt)
    steps = LONG if zero == 2 else 4
    SFTTrainer(load_stage_config(SFTConfig, None, sft_overrides(out, sft_data, tokenizer_dir, zero, steps)),
               backbone).fit()
    assert "at step 2 (written by 2 ranks)" in capsys.readouterr().out
    # the same curve as the uninterrupted 2-rank run (one rank sums in another order)
    assert train_losses(out) == pytest.approx(train_losses(src), abs=1e-5)
    assert (out / "checkpoints" / "step-00000002" / "universal").is_dir() == (zero > 0)


def rlhf_stage(out_args, num_procs, signal_target=None, sig=signal.SIGTERM, after_step=1, timeout=300):
    """Run `rlhf sft` (a file-less config: all overrides) on `num_procs` ranks; with
    `signal_target` ("cli" or "rank1"), send `sig` once the run has logged `after_step`.
    Returns (exit code, output)."""
    import psutil

    out = Path(next(a.split("=", 1)[1] for a in out_args if a.startswith("output_dir=")))
    config = out.parent / "empty.yaml"
    config.write_text("{}\n")
    cmd = [sys.executable, "-m", "rlhf.cli", "sft", str(config), *out_args]
    if num_procs > 1:
        cmd += ["--num-procs", str(num_procs)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if signal_target is not None:
        deadline = time.time() + timeout
        while not any(r.get("step", 0) >= after_step and "train/loss" in r
                      for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()
                                   if (out / "metrics.jsonl").exists() else [])):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
            time.sleep(0.05)
        target = proc.pid
        if signal_target == "rank1":
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "--local_rank=1" in p.cmdline()]
            target = ranks[0].pid
        os.kill(target, sig)
    text = proc.communicate(timeout=timeout)[0]
    return proc.returncode, text


def test_signals_through_the_rlhf_launcher_stop_every_rank_and_the_run_resumes_anywhere(
        two_rank_runs, tmp_path, sft_data, tokenizer_dir):
    out = tmp_path / "out"
    args = sft_overrides(out, sft_data, tokenizer_dir, 2, LONG)
    stops = []
    # SIGTERM to the launcher's own process (Kubernetes), then SIGUSR1 to one rank only
    # (a signal that reaches part of the job): both ranks stop after the same step.
    for target, sig, procs in [("cli", signal.SIGTERM, 2), ("rank1", signal.SIGUSR1, 2), ("cli", signal.SIGUSR1, 1)]:
        rc, text = rlhf_stage(args, procs, target, sig, after_step=(stops[-1] + 1 if stops else 1))
        assert rc == 75, text[-3000:]
        stops.append(int(text.split("stopped on request after step ")[1].split(",")[0]))
        assert f"step-{stops[-1]:08d}" in checkpoints(out) and not (out / "final").exists()
    assert stops == sorted(stops) and stops[-1] < LONG, stops
    rc, text = rlhf_stage(args, 2)  # written by 1 rank, resumed on 2
    assert rc == 0 and "[sft] done" in text, text[-3000:]
    ref = two_rank_runs / "zero2"
    # the rank counts changed on the way (2, 2, 1, 2): fp32 sums in another order
    assert train_losses(out) == pytest.approx(train_losses(ref), abs=1e-5)
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_kill_9_during_a_checkpoint_write_and_at_random_then_the_run_resumes_exactly(tmp_path, sft_data,
                                                                                    tokenizer_dir):
    """The test-suite size of benchmarks/kill_resume.py (which kills each stage 10 times)."""
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kill_resume import kill_once

    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")

    def cmd(out):
        return [sys.executable, "-m", "rlhf.cli", "sft", str(config),
                *sft_overrides(out, sft_data, tokenizer_dir, 0, 60), "checkpoint.every=1", "checkpoint.keep_last=2"]

    subprocess.run(cmd(tmp_path / "ref"), env=subprocess_env(), check=True, capture_output=True)
    out = tmp_path / "out"
    for mode in ("write", "random"):
        got = kill_once(cmd(out), subprocess_env(), out, mode, random.Random(0), max_delay=0.5)
        assert got is not None and got["checkpoints_checked"] >= 1, got  # each one opened and read
        assert got["during_write"] or mode == "random", got
    proc = subprocess.run(cmd(out), env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".deleting-"))]
    a, b = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
