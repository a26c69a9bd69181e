"""vLLM as the rollout engine (rlhf/rollout/vllm.py): greedy tokens equal to the HF
engine's before and after optimizer updates (so weight sync is proven), on 1 rank,
with LoRA, and with ZeRO-3 on 2 ranks; sampled first-token frequencies match
softmax(logits / T) cut by top-k and top-p; the config refuses what cannot work.

Marked `vllm`; skipped where vllm is not installed (pip install -e '.[vllm]'). Each
engine runs in a process of its own (tests/vllm_run.py).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, subprocess_env
from rlhf.config import ConfigError, GRPOConfig, load_stage_config

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (pip install -e '.[vllm]')")
pytestmark = pytest.mark.vllm
RUN = str(ROOT / "tests" / "vllm_run.py")


def run(cmd: list[str], marker: str, count: int = 1) -> str:
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    # The marker, not only the exit code: see tests/dist_run.py.
    assert proc.stdout.count(marker) == count, out[-6000:]
    return proc.stdout


def run_two_ranks(args: list[str], marker: str) -> str:
    from test_distributed import free_port

    port = free_port()
    out = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               RUN, *args], marker, count=2)
    assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) == []
    return out


@needs_vllm
@pytest.mark.parametrize("zero_stage,lora_r", [(0, 0), (0, 4)], ids=["zero0", "zero0-lora"])
def test_greedy_equals_hf_before_and_after_updates(tokenizer_dir, zero_stage, lora_r):
    run([sys.executable, RUN, "sync", str(tokenizer_dir), str(zero_stage), str(lora_r)], "VLLM_SYNC_OK")


@needs_vllm
@pytest.mark.parametrize("lora_r", [0, 4], ids=["zero3", "zero3-lora"])
def test_greedy_equals_hf_zero3_two_ranks(tokenizer_dir, lora_r):
    run_two_ranks(["sync", str(tokenizer_dir), "3", str(lora_r)], "VLLM_SYNC_OK")


def expected_distribution(logits: torch.Tensor, pad: int, temperature: float, top_k: int, top_p: float,
                          apply=("pad", "temperature", "top_k", "top_p")) -> torch.Tensor:
    """What the settings describe, through the HF engine's own warpers (rlhf.rollout.hf);
    `apply` leaves steps out, to show that a wrong mapping would fail the test."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    s = logits[None].clone()
    if "pad" in apply:
        s[0, pad] = float("-inf")
    if "temperature" in apply:
        s = s / temperature
    if "top_k" in apply:
        s = TopKLogitsWarper(top_k)(None, s)
    if "top_p" in apply:
        s = TopPLogitsWarper(top_p)(None, s)
    return torch.softmax(s, -1)[0].double()


@needs_vllm
def test_sampled_frequencies_match_the_settings(tokenizer_dir):
    out = run([sys.executable, RUN, "sample", str(tokenizer_dir)], "VLLM_SAMPLE")
    d = json.loads(out.split("VLLM_SAMPLE ", 1)[1].splitlines()[0])
    counts = torch.tensor(d["counts"], dtype=torch.float64)
    freq = counts / counts.sum()
    logits = torch.tensor(d["logits"])
    settings = (d["pad"], d["temperature"], d["top_k"], d["top_p"])
    p = expected_distribution(logits, *settings)
    tv = 0.5 * (freq[:len(p)] - p).abs().sum().item()
    # 4000 draws over ~10 tokens: the total variation of an exact sampler is ~0.02.
    bound = 0.05
    assert tv < bound, (tv, freq[p > 0].tolist(), p[p > 0].tolist())
    assert counts[p == 0].sum() == 0  # nothing outside top-k / top-p, never pad
    # The test can fail: each setting left out moves the distribution well past the bound.
    for left_out in ("temperature", "top_k", "top_p"):
        wrong = expected_distribution(logits, *settings, apply=tuple(
            s for s in ("pad", "temperature", "top_k", "top_p") if s != left_out))
        assert 0.5 * (wrong - p).abs().sum().item() > 2 * bound, left_out


def test_config_names_the_key(tmp_path):
    """rollout.engine=vllm is refused at load time, naming the key, where vllm is
    absent, and with logprobs_from_generation (the training engine recomputes them)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    base = ["policy.model.arch={model_type: llama}", "reward.model.arch={model_type: llama}",
            f"data.path={data}", "rollout.engine=vllm"]
    if not HAVE_VLLM:
        with pytest.raises(ConfigError, match=r"rollout\.engine.*vllm is not installed"):
            load_stage_config(GRPOConfig, None, base)
        return
    with pytest.raises(ConfigError, match=r"rollout\.logprobs_from_generation"):
        load_stage_config(GRPOConfig, None, [*base, "rollout.logprobs_from_generation=true"])
    with pytest.raises(ConfigError, match=r"rollout\.vllm\.gpu_memory_utilization"):
        load_stage_config(GRPOConfig, None, [*base, "rollout.vllm.gpu_memory_utilization=1.5"])
