"""What the side-by-side benchmarks share: the task data and tokenizer, one model directory
both frameworks load, running each framework in a child process (so that its peak memory
is its own), and the median of repeated runs.

Each benchmark script is both the parent (`python benchmarks/bench_X.py`) and the child
(`--child ours|trl --spec JSON`): the child prints one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def model_arch(hidden: int, layers: int, heads: int, max_positions: int = 256, intermediate: int | None = None,
               kv_heads: int | None = None) -> dict:
    """A Llama-style architecture (the quickstart's family) of the given size; the MLP
    twice the hidden size and half as many key/value heads unless given."""
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate or hidden * 2,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or max(1, heads // 2), "max_position_embeddings": max_positions,
            "tie_word_embeddings": True}


def arch_of(args: argparse.Namespace, max_positions: int = 256) -> dict:
    """`model_arch` from the --hidden/--layers/--heads/--intermediate/--kv-heads arguments."""
    return model_arch(args.hidden, args.layers, args.heads, max_positions, args.intermediate, args.kv_heads)


def prepare(work: Path, arch: dict, seed: int = 0, num_sft: int = 4000, num_pairs: int = 4000,
            num_prompts: int = 2000) -> dict[str, str]:
    """Task files, tokenizer, and a random-init causal LM (and a scalar-head model made
    from it) saved once, so that both frameworks start from identical weights."""
    import torch

    from rlhf.config import ModelConfig, TokenizerConfig
    from rlhf.models import load_causal_lm, load_scalar_model, load_tokenizer
    from rlhf.task import TaskConfig, build_tokenizer, write_task_data

    work.mkdir(parents=True, exist_ok=True)
    task = TaskConfig(seed=seed, num_sft=num_sft, num_pairs=num_pairs, num_prompts=num_prompts)
    files = write_task_data(work / "task", task)
    build_tokenizer(work / "task" / "tokenizer", task)
    tok = load_tokenizer(TokenizerConfig(path=str(work / "task" / "tokenizer")))
    model_dir, rm_dir = work / "model", work / "rm_model"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(seed)
        model = load_causal_lm(ModelConfig(arch=arch, dropout=0.0), tok)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    if not (rm_dir / "config.json").exists():
        torch.manual_seed(seed + 1)
        rm = load_scalar_model(ModelConfig(path=str(model_dir), dropout=0.0), tok)
        rm.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
    out = {k: str(v) for k, v in files.items()}
    out.update(model=str(model_dir), rm_model=str(rm_dir), tokenizer=str(work / "task" / "tokenizer"))
    return out


def sync(spec: dict) -> None:
    """Wait for the GPU, so that a timer reads finished work."""
    if spec["device"] != "cpu":
        import torch

        torch.cuda.synchronize()


def timed(spec: dict, fn) -> float:
    """Seconds `fn()` takes, device work included."""
    sync(spec)
    t0 = time.perf_counter()
    fn()
    sync(spec)
    return time.perf_counter() - t0


def timed_ours(spec: dict, trainer) -> float:
    """Seconds of an rlhf trainer's training loop, run as `Trainer.fit` runs it."""
    from rlhf.trainers.base import setup_frozen

    with setup_frozen():
        return timed(spec, trainer.train)


def train_timer(spec: dict):
    """A transformers TrainerCallback timing a HF/TRL trainer's training loop (from its
    train-begin to its train-end event: model loading and tokenization excluded);
    the result is its `seconds`."""
    from transformers import TrainerCallback

    class TrainTimer(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, *a, **k):
            sync(spec)
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            sync(spec)
            self.seconds = time.perf_counter() - self.t0

    return TrainTimer()


def precision_overrides(precision: str) -> list[str]:
    """Our DeepSpeed settings for a precision: bf16 trains with fp32 master weights in
    DeepSpeed's ZeRO-1 optimizer (on one rank that shards nothing), fp32 on ZeRO-0."""
    return [f"deepspeed.precision={precision}", f"deepspeed.zero_stage={1 if precision == 'bf16' else 0}"]


def supervised_overrides(spec: dict, model: str, data: str) -> list[str]:
    """Our config for the SFT and RM benchmarks: the settings TRL's trainers are given."""
    return [
        f"output_dir={Path(spec['work']) / f'ours-{time.time_ns()}'}", f"model.path={model}",
        f"tokenizer.path={spec['tokenizer']}", f"data.path={data}", f"data.max_length={spec['max_length']}",
        f"train.global_batch_size={spec['batch']}", f"train.micro_batch_size={spec['batch']}",
        f"train.epochs={spec['epochs']}", f"train.log_every={spec['log_every']}", f"optim.lr={spec['lr']}",
        "optim.scheduler=linear", f"optim.warmup_steps={spec['warmup']}", "optim.weight_decay=0.0",
        "optim.betas=[0.9, 0.95]", "optim.max_grad_norm=1.0", "model.dropout=0.0", "logging.progress_bar=false",
        *precision_overrides(spec["precision"]), f"seed={spec['seed']}", *spec.get("ours", [])]


def long_sft_rows(src: str, dst: Path, n: int, per_row: int, seed: int = 0) -> str:
    """SFT rows with long responses (`per_row` task demonstrations joined), for GPU runs
    where the task's ~25-token rows would leave the device idle."""
    import random

    rows = [json.loads(x) for x in Path(src).read_text().splitlines()]
    rng = random.Random(seed)
    with dst.open("w") as f:
        for _ in range(n):
            picked = rng.sample(rows, per_row)
            f.write(json.dumps({"prompt": picked[0]["prompt"],
                                "response": " ".join(r["response"] for r in picked)}) + "\n")
    return str(dst)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    result["peak_rss_mb"] = peak_rss_mb()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print("RESULT " + json.dumps(result), flush=True)


def run_child(script: str, who: str, spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    proc = subprocess.run([sys.executable, script, "--child", who, "--spec", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{who} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.time() - t0
    return result


def host() -> dict:
    """The machine a result was measured on: ratios between frameworks move with the CPU
    (how much of a step is arithmetic both share, how much per-op overhead)."""
    import platform

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "simd": sorted(f for f in flags if f.startswith(("avx", "amx")))}
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return out


def compare(script: str, spec: dict, repeats: int, keys: list[str]) -> dict:
    """Run ours and TRL alternately `repeats` times; medians of `keys` per framework."""
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for i in range(repeats):
        for who in ("ours", "trl") if i % 2 == 0 else ("trl", "ours"):
            r = run_child(script, who, spec)
            runs[who].append(r)
            print(f"  run {i + 1} {who}: " + ", ".join(f"{k}={r[k]:.4g}" for k in keys if k in r), flush=True)
    med = {who: {k: statistics.median(r[k] for r in rs) for k in keys + ["peak_rss_mb"] if k in rs[0]}
           for who, rs in runs.items()}
    return {"median": med, "runs": runs, "spec": spec, "host": host()}


def table(result: dict, keys: list[str], ratio_key: str) -> str:
    med = result["median"]
    lines = ["| metric | ours | TRL | ours / TRL |", "|---|---|---|---|"]
    for k in keys + ["peak_rss_mb"]:
        a, b = med["ours"].get(k), med["trl"].get(k)
        if a is None:
            continue
        if b is None:  # measured for ours only (e.g. our phase split)
            lines.append(f"| {k} | {a:.4g} | | |")
            continue
        lines.append(f"| {k} | {a:.4g} | {b:.4g} | {a / b:.2f}x |" if b else f"| {k} | {a:.4g} | {b:.4g} | |")
    return "\n".join(lines)


def model_args(p: argparse.ArgumentParser, hidden: int = 128, layers: int = 2) -> None:
    """The scratch directory and the size of the Llama-style model a benchmark builds."""
    p.add_argument("--work", default="/tmp/rlhf-bench", help="scratch directory (data, models, runs)")
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2 x hidden)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads / 2)")


def ppo_shape_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The PPO benchmark's step layout: prompts per rollout, micro-batch, response length."""
    p.add_argument("--steps", type=int, default=steps, help="PPO steps (rollout batches)")
    p.add_argument("--rollout", type=int, default=64)
    p.add_argument("--micro", type=int, default=32)
    p.add_argument("--response-length", type=int, default=24)


def prepare_ppo(args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    """The PPO scripts' scratch directory and files (one per model size, shared by them)."""
    work = Path(args.work) / f"ppo-h{args.hidden}-l{args.layers}-i{args.intermediate}"
    return work, prepare(work, arch_of(args))


def parent_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--child", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    model_args(p)
    p.add_argument("--repeats", type=int, default=3, help="runs per framework (median reported)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for our config (repeatable), for ablations, "
                        "e.g. --ours reward.shared_prefix=false")
    return p


def save(result: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
