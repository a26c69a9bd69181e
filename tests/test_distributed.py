"""One rank equals two: ZeRO 0-3 on 2 CPU ranks (gloo) give the losses and weights of 1 rank.
And a simulated two-node run on loopback through the `rlhf` launcher."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_ARCHS, subprocess_env
from rlhf.config import SFTConfig, load_stage_config
from rlhf.trainers.sft import SFTTrainer
from test_sft import write_sft_data

STAGES = ["0", "1", "2", "3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(tmp, tokenizer_dir):
    train = write_sft_data(tmp / "train.jsonl", 64)
    ev = write_sft_data(tmp / "eval.jsonl", 16, seed=1)
    extra = ["data.max_length=32", "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=4",
             "optim.lr=3e-3", "model.dropout=0.0", "logging.progress_bar=false",
             f"model.arch={json.dumps(TINY_ARCHS['llama'])}"]
    return train, ev, extra


def train_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r], [r["eval/loss"] for r in rows if "eval/loss" in r]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("dist")
    train, ev, extra = common(tmp, tokenizer_dir)
    run_two_ranks("sft", tmp / "two", STAGES, [f"tokenizer.path={tokenizer_dir}", f"data.path={train}",
                                               f"data.eval.path={ev}", *extra])
    return tmp, train, ev, extra


def run_two_ranks(stage, out, zero_stages, overrides):
    """Run `stage` on 2 CPU ranks once per ZeRO stage (tests/dist_run.py)."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(ROOT / "tests" / "dist_run.py"), stage, str(out), ",".join(zero_stages), *overrides]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    # Check the marker, not only the exit code (see dist_run.py).
    assert "DIST_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's shared-memory all-reduce buffers (66 MB a rank, in RAM) are not left behind
    assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) == []
    return proc.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_equal_one_rank(stage, two_rank_runs, tokenizer_dir, backbone):
    tmp, train, ev, extra = two_rank_runs
    cfg = load_stage_config(SFTConfig, None, [
        f"output_dir={tmp}/one/zero{stage}", f"tokenizer.path={tokenizer_dir}", f"data.path={train}",
        f"data.eval.path={ev}", f"deepspeed.zero_stage={stage}", *extra])
    SFTTrainer(cfg, backbone).fit()
    one, two = tmp / "one" / f"zero{stage}", tmp / "two" / f"zero{stage}"
    (l1, e1), (l2, e2) = train_losses(one), train_losses(two)
    assert len(l1) == 4
    assert l1 == pytest.approx(l2, abs=1e-5) and e1 == pytest.approx(e2, abs=1e-5)
    w1, w2 = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


def test_simulated_two_node_run(tmp_path, tokenizer_dir):
    # Two launcher invocations, one per "node", each starting its own rank with
    # --no-ssh, as a SLURM job does with one launcher per node.
    train, ev, extra = common(tmp_path, tokenizer_dir)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    config = tmp_path / "sft.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\ntokenizer: {{path: {tokenizer_dir}}}\n"
                      f"data: {{path: {train}, eval: {{path: {ev}}}}}\ndeepspeed: {{zero_stage: 2}}\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "rlhf.cli", "sft", str(config), *extra, "--hostfile", str(hostfile),
               "--num-procs", "1", "--no-ssh", "--node-rank", str(node), "--master-addr", "127.0.0.1",
               "--master-port", port]
        procs.append(subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert "[sft] done" in outs[0], outs[0][-3000:]
    assert "(2 ranks x 4 x 1 accumulation)" in outs[0], outs[0][-3000:]
    losses, _ = train_losses(tmp_path / "out")
    assert len(losses) == 4
