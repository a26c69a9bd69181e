"""The main job end to end: `rlhf pipeline configs/quickstart.yaml` reaches its goals, an
interrupted pipeline (kill -9 in each stage) finishes with the same figures, the outputs
work with `rlhf chat`, `rlhf eval` and plain transformers, and bad input fails early."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, subprocess_env

CONFIG = str(ROOT / "configs" / "quickstart.yaml")
# Checkpoints often enough to be killed between them; the math is the same either way.
CKPT = ["sft.checkpoint.every=100", "rm.checkpoint.every=100", "ppo.checkpoint.every=20",
        "logging.progress_bar=false"]


def rlhf(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "run"
    proc = rlhf("pipeline", CONFIG, f"output_dir={root}", *CKPT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, json.loads((root / "report.json").read_text()), proc.stdout


def test_quickstart_pipeline_reaches_its_goals(run):
    root, rep, stdout = run
    assert rep["rm"]["eval_accuracy"] >= 0.95
    assert rep["ppo"]["win_rate"] >= 0.8
    assert rep["ppo"]["gold_reward_ppo"] > rep["ppo"]["gold_reward_sft"] + 0.3
    assert rep["ppo"]["rm_score_ppo"] > rep["ppo"]["rm_score_sft"]
    assert 0 < rep["ppo"]["kl"] < 10
    # Demonstrations draw each adjective uniformly from 16, so the best achievable
    # perplexity is about 3.15 (a random model starts near the vocabulary size, 512).
    assert rep["sft"]["eval_perplexity"] < 3.5
    for f in ("report.md", "report.png", "timings.json", "pipeline.yaml", "sft/final", "rm/final", "ppo/final"):
        assert (root / f).exists(), f
    assert "PPO win rate over SFT (gold)" in stdout
    rows = [json.loads(x) for x in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    ratios = [r["ppo/ratio_at_start"] for r in rows if "ppo/ratio_at_start" in r]
    assert ratios and all(abs(x - 1) < 1e-5 for x in ratios)  # old and new log-probs agree before any update


def test_kill_9_in_each_stage_then_resume_gives_the_same_report(run, tmp_path):
    _, reference, _ = run
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhf.cli", "pipeline", CONFIG, f"output_dir={root}", *CKPT]
    for stage in ("sft", "rm", "ppo"):
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=ROOT)
        deadline = time.time() + 600
        while not list((root / stage / "checkpoints").glob("step-*")):
            assert proc.poll() is None, f"the pipeline ended before a {stage} checkpoint"
            assert time.time() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (root / stage / "final").exists()  # killed mid-stage
    proc = rlhf("pipeline", CONFIG, f"output_dir={root}", *CKPT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    rep = json.loads((root / "report.json").read_text())
    for section in ("sft", "rm", "ppo"):
        assert rep[section] == pytest.approx(reference[section], abs=1e-6), section


def test_outputs_work_with_chat_eval_and_plain_transformers(run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, _ = run
    from rlhf.task import gold_reward

    prompt = "Describe the apple and the river.\n"
    proc = rlhf("chat", root / "ppo" / "final", "--prompt", prompt.strip(), "--greedy")
    assert proc.returncode == 0, proc.stderr
    assert gold_reward(prompt, proc.stdout.strip()) > 0.5, proc.stdout  # a well-formed, nice answer
    chat = subprocess.run([sys.executable, "-m", "rlhf.cli", "chat", str(root / "ppo" / "final")],
                          input="Describe the stone and the city.\n", env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    reply = chat.stdout.split("> ", 1)[-1].strip().splitlines()[0]
    assert chat.returncode == 0 and gold_reward("Describe the stone and the city.", reply) > -1, chat.stdout
    out = tmp_path / "eval.json"
    proc = rlhf("eval", "--policy", root / "ppo" / "final", "--baseline", root / "sft" / "final",
                "--reward-model", root / "rm" / "final", "--prompts", root / "task" / "prompts_eval.jsonl",
                "--task-gold", "--limit", 64, "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["prompts"] == 64 and result["win_rate"] > 0.7 and result["win_rate_score"] > 0.7
    # the exported policy loads and generates in plain transformers
    tok = AutoTokenizer.from_pretrained(root / "ppo" / "final")
    model = AutoModelForCausalLM.from_pretrained(root / "ppo" / "final")
    ids = tok("Describe the garden and the boat.\n", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert gold_reward("Describe the garden and the boat.", text) > 0.5, text


@pytest.mark.parametrize("args,message", [
    (["optim.lr=-1"], "optim.lr: must be > 0"),
    (["train.micro_batch_size=5"], "must be divisible by train.micro_batch_size x ranks = 5"),
    (["train.micro_bach_size=5"], "unknown config key 'train.micro_bach_size'; did you mean 'micro_batch_size'"),
    (["deepspeed.zero_stage=7"], "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
    (["task=null", "data.path=/no/such/file.jsonl"], "data.path: no such file"),
])
def test_bad_input_fails_before_any_work(args, message, tmp_path):
    proc = rlhf("sft", CONFIG, f"output_dir={tmp_path / 'out'}", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_data_names_file_line_and_field_and_keeps_the_run_dir(tmp_path, tokenizer_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 7}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("an earlier run")  # an existing run directory
    proc = rlhf("sft", CONFIG, f"output_dir={out}", "task=null", f"data.path={data}", "data.eval=null",
                f"tokenizer.path={tokenizer_dir}", timeout=120)
    assert proc.returncode == 2
    assert f"{data}:2: field 'response' must be a string, got int" in proc.stderr, proc.stderr
    assert (out / "config.yaml").read_text() == "an earlier run"  # nothing overwritten
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_pipeline_dry_run_prints_commands_and_writes_nothing(tmp_path):
    proc = rlhf("pipeline", CONFIG, f"output_dir={tmp_path / 'run'}", "--num-procs", "2", "--dry-run",
                *[f"{s}.train.micro_batch_size=16" for s in ("sft", "rm", "ppo")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("deepspeed.launcher.runner --num_gpus 2") == 3
    assert not (tmp_path / "run").exists()


def test_sft_then_dpo_reaches_its_goal(run):
    """`--stages sft,dpo` on the same root: SFT is found finished, DPO starts from it and
    the report gains a dpo section (the win rate over SFT by gold reward, no reward model)."""
    root, _, _ = run
    proc = rlhf("pipeline", CONFIG, f"output_dir={root}", "logging.progress_bar=false", "--stages", "sft,dpo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sft: finished before, skipped" in proc.stdout and "DPO win rate over SFT (gold)" in proc.stdout
    d = json.loads((root / "report.json").read_text())["dpo"]
    assert d["win_rate"] >= 0.8 and d["gold_reward_policy"] > d["gold_reward_sft"] + 0.3, d
    assert d["eval_reward_accuracy"] >= 0.9 and 0 < d["kl"] < 10, d
    assert json.loads((root / "report.json").read_text())["time_s"]["dpo"] > 0


def test_sft_then_grpo_on_a_reward_function(run):
    """`--stages sft,grpo` with the task's gold reward as a reward function: no reward
    model is loaded or filled in, and GRPO's gold reward rises above SFT's."""
    root, _, _ = run
    proc = rlhf("pipeline", CONFIG, f"output_dir={root}", "logging.progress_bar=false", "--stages", "sft,grpo",
                "grpo.reward.function=rlhf.task:gold_rewards", "grpo.reward.model.path=null",
                "grpo.train.max_steps=30", "grpo.train.eval_every=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "grpo.reward.model.path" not in proc.stdout  # not filled in from the RM
    g = json.loads((root / "report.json").read_text())["grpo"]
    assert g["rm_score_policy"] is None and g["gold_reward_policy"] > g["gold_reward_sft"] + 0.2, g
    rows = [json.loads(x) for x in (root / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("time/reward_function_s" in r for r in rows)


def test_a_pipeline_without_rm_and_ppo_sections_runs_sft_and_dpo(tmp_path):
    import yaml

    data = yaml.safe_load(open(CONFIG))
    for stage in ("rm", "ppo", "grpo", "rloo", "reinforce"):
        del data[stage]
    config = tmp_path / "sft_dpo.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = rlhf("pipeline", config, f"output_dir={tmp_path / 'run'}", "--stages", "sft,dpo", "--dry-run", timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("--config") == 2, proc.stdout + proc.stderr
    proc = rlhf("pipeline", config, f"output_dir={tmp_path / 'run'}", "--dry-run", timeout=120)
    assert proc.returncode == 2 and "has no section for rm, ppo (it has: sft, dpo)" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
