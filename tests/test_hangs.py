"""No rank waits forever: every loop that runs collectives makes the same passes on every
rank (evaluation splits that do not divide, the LM head in chunks over rows of different
lengths, under ZeRO-3 with every layer partitioned),
and a rank that dies ends the others within the collective timeout, with a message."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_ARCHS, subprocess_env
from rlhf.data.batching import eval_batches
from test_distributed import free_port
from test_ppo import metrics, models  # noqa: F401 (models: a fixture)
from test_sft import write_sft_data

# Every parameter partitioned, as a real-size model's are: then each forward pass is a
# collective (tiny layers otherwise stay whole under the default persistence threshold).
ZERO3_PARTITIONED = ["deepspeed.zero_stage=3", "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"]


@pytest.mark.parametrize("n,size,world", [(65, 16, 2), (64, 16, 2), (5, 4, 4), (3, 2, 4), (17, 8, 2), (7, 3, 1)])
def test_eval_batches_same_passes_on_every_rank_and_every_sample_once(n, size, world):
    per_rank = [list(eval_batches(n, size, world, r)) for r in range(world)]
    # the same number of batches, of the same sizes, on every rank
    assert len({tuple(len(idx) for idx, _ in batches) for batches in per_rank}) == 1
    # the real samples, all ranks together, are each sample exactly once
    real = sorted(i for batches in per_rank for idx, k in batches for i in idx[:k])
    assert real == list(range(n))
    assert all(len(idx) <= size for batches in per_rank for idx, _ in batches)


def run_jobs(jobs, tmp_path, timeout=600):
    """Run [stage, overrides] jobs on 2 CPU ranks in one launcher start (tests/dist_jobs.py).
    A hang fails the test at `timeout` instead of hanging it."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "dist_jobs.py"), str(spec)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "DIST_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def eval_rows(out):
    return [{k: v for k, v in r.items() if k.startswith("eval/")} for r in metrics(out) if "eval/loss" in r
            or "eval/score" in r]


@pytest.fixture(scope="module")
def eos_prone_policy(models, tmp_path_factory):
    """The tiny policy with its EOS logit scaled up: greedy responses to the eval prompts end
    after 3 to 8 tokens, so the two ranks' generations run different numbers of steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("eos_prone")
    model, tok = AutoModelForCausalLM.from_pretrained(models / "policy"), AutoTokenizer.from_pretrained(models / "policy")
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 3
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_uneven_eval_splits_finish_on_two_ranks_with_partitioned_zero3(tmp_path, tokenizer_dir, task_dir, models,
                                                                       eos_prone_policy, backbone):
    from dist_run import trainer_class
    from rlhf.cli import config_class
    from rlhf.config import load_stage_config

    # 65 eval rows over 2 ranks in batches of 16: rank 0 has 3 batches, rank 1 only 2.
    sft_eval = write_sft_data(tmp_path / "sft_eval.jsonl", 65, seed=1)
    pairs_eval = tmp_path / "pairs_eval.jsonl"
    pairs_eval.write_text("".join((task_dir / "pairs_eval.jsonl").read_text().splitlines(True)[:65]))
    # 9 prompts in batches of 4 (rank 0: 4 + 1, rank 1: 4 + none), each scored in chunks
    # of 2; greedy (top_k=1), so that 1 rank and 2 ranks draw the same responses.
    prompts_eval = tmp_path / "prompts_eval.jsonl"
    prompts_eval.write_text("".join((task_dir / "prompts_eval.jsonl").read_text().splitlines(True)[:9]))
    common = ["train.max_steps=1", "logging.progress_bar=false", "model.dropout=0.0"]
    # The LM head in chunks of a few positions: the ranks' rows hold different numbers
    # of targets, so different numbers of chunks, while each chunk gathers the head.
    CHUNKS = ["model.logits_chunk_mib=0.01"]
    jobs = {
        "sft": [f"tokenizer.path={tokenizer_dir}", f"data.path={write_sft_data(tmp_path / 'sft.jsonl', 64)}",
                f"data.eval.path={sft_eval}", "data.max_length=32", "train.global_batch_size=32",
                "train.micro_batch_size=16", f"model.arch={json.dumps(TINY_ARCHS['llama'])}", *CHUNKS, *common],
        "rm": [f"model.path={models / 'policy'}", f"data.path={task_dir / 'pairs_train.jsonl'}",
               f"data.eval.path={pairs_eval}", "data.max_samples=64", "data.max_length=48",
               "train.global_batch_size=32", "train.micro_batch_size=16", *common],
        "ppo": [f"policy.model.path={eos_prone_policy}", f"value.model.path={models / 'rm'}",
                f"reward.model.path={models / 'rm'}", f"data.path={task_dir / 'prompts_train.jsonl'}",
                f"data.eval.path={prompts_eval}", "data.max_samples=64", "rollout.batch_size=8",
                "rollout.max_new_tokens=8", "rollout.top_k=1", "train.global_batch_size=8",
                "train.micro_batch_size=2", "ppo.epochs=1", "logging.progress_bar=false", "train.max_steps=1",
                *(f"policy.{c}" for c in CHUNKS)],
    }
    run_jobs([[s, [f"output_dir={tmp_path / 'two' / s}", *ov, *ZERO3_PARTITIONED]] for s, ov in jobs.items()],
             tmp_path)
    for stage, overrides in jobs.items():
        cfg = load_stage_config(config_class(stage), None, [f"output_dir={tmp_path / 'one' / stage}", *overrides,
                                                            *ZERO3_PARTITIONED])
        trainer_class(stage)(cfg, backbone).fit()
        one, two = eval_rows(tmp_path / "one" / stage), eval_rows(tmp_path / "two" / stage)
        assert len(one) == 2 and len(two) == 2, stage  # at the start and at the end
        for a, b in zip(one, two):  # every eval sample counted once: the 1-rank figures
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-4) for k in a), (stage, a, b)
    assert 1 < eval_rows(tmp_path / "two" / "ppo")[0]["eval/response_length"] < 8  # responses of many lengths


# ---------------------------------------------------------------------- a rank that dies or stalls

def sft_args(out, tokenizer_dir, task_dir, *extra):
    return [f"output_dir={out}", f"tokenizer.path={tokenizer_dir}", f"data.path={task_dir / 'sft_train.jsonl'}",
            "data.max_length=32", "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=1000",
            f"model.arch={json.dumps(TINY_ARCHS['llama'])}", "logging.progress_bar=false", "checkpoint.every=2",
            *extra]


def start_ranks(args, n=2):
    """`n` ranks of launch/sft.py started directly (no launcher), as torchrun or a
    scheduler would; their output goes to pipes."""
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(n),
                         LOCAL_WORLD_SIZE=str(n))
    return [subprocess.Popen([sys.executable, str(ROOT / "launch" / "sft.py"), *args], text=True,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for r in range(n)]


def wait_for_checkpoint(out, procs, timeout=300):
    deadline = time.time() + timeout
    while not (out / "checkpoints").is_dir() or not any(p.name.startswith("step-")
                                                          for p in (out / "checkpoints").iterdir()):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "no checkpoint came"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["kill rank 0", "stop rank 1"])
def test_a_rank_that_dies_or_stalls_ends_the_other_within_the_timeout_naming_it(how, tmp_path, tokenizer_dir,
                                                                                task_dir, backbone):
    from rlhf.config import SFTConfig, load_stage_config
    from rlhf.trainers.sft import SFTTrainer

    timeout_s = 9
    out = tmp_path / "out"
    procs = start_ranks(sft_args(out, tokenizer_dir, task_dir, f"train.collective_timeout_minutes={timeout_s / 60}"))
    try:
        wait_for_checkpoint(out, procs)
        lost = int(how[-1])
        procs[lost].send_signal(signal.SIGKILL if how.startswith("kill") else signal.SIGSTOP)
        t0 = time.time()
        rest = procs[1 - lost]
        _, err = rest.communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert rest.returncode == 76, err[-3000:]
    # a killed rank is noticed at once, a stalled one when the timeout ends; then a few
    # seconds for the others to report in
    assert elapsed < timeout_s + 15, elapsed
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"lost rank {lost} (it died, or stalled longer than the collective timeout" in line, line
    # the last checkpoint is whole: it loads, and training goes on from it (here 1 more step)
    # (a rank killed mid-write leaves a temporary directory beside them, removed at the next start)
    from rlhf.backbone import list_checkpoints

    last = int(list_checkpoints(out / "checkpoints")[-1].name[5:])
    cfg = load_stage_config(SFTConfig, None, sft_args(out, tokenizer_dir, task_dir, f"train.max_steps={last + 1}"))
    SFTTrainer(cfg, backbone).fit()
    assert (out / "final").is_dir()


def test_under_the_launcher_a_killed_rank_ends_the_run(tmp_path, tokenizer_dir, task_dir):
    """DeepSpeed's launch.py SIGTERMs the ranks left when one exits; they still report which
    rank they lost, and the run ends non-zero at once."""
    import psutil

    out = tmp_path / "out"
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "sft", str(config), *sft_args(out, tokenizer_dir, task_dir),
                             "--num-procs", "2"], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(out, [proc])
    [rank1] = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
    rank1.kill()
    t0 = time.time()
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and time.time() - t0 < 30, text[-3000:]
    assert "rank 0 lost rank 1 (it died" in text, text[-3000:]
