"""Reward model: rlhf's RewardTrainer against TRL's RewardTrainer, side by side.

Same starting model (a random-init Llama-style directory loaded as
AutoModelForSequenceClassification with num_labels=1), tokenizer, preference pairs (the
built-in task's, explicit prompt), batch size, steps, schedule, AdamW settings, fp32.
Both append EOS to each response and score the last token; with this tokenizer TRL's
tokenization of prompt + response + EOS as one string gives the same ids as ours.
Each framework runs in its own child process, alternately; medians are reported.

Measured: pairs per second over the training loop only, the child's peak RSS, and the
held-out accuracy of the trained model on the same pairs, by one function for both.

    python benchmarks/bench_rm.py --out benchmarks/results/rm_cpu.json
    python benchmarks/bench_rm.py --ours reward.shared_prefix=false   # ablation: pairs as separate rows

On a real model (`--model smollm2`: 8 steps of 32 of the task's pairs, prompts in
SmolLM2's chat template, a new scalar head on SmolLM2, lr 1e-5), a third child runs the
floor: our trainer's micro-batches (in its layout: shared prefixes by default) through
the bare scalar-head model, Bradley-Terry loss, backward, clipping and fused AdamW,
giving the floor's pairs/s and model GFLOP/s, and the 2048-square matmul's GFLOP/s:

    python benchmarks/bench_rm.py --model smollm2 --repeats 3 --out benchmarks/results/rm_smollm2_cpu.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (call_clock, compare, emit, floor_gflops, is_real, parent_args, prepare_pairs, save,
                    shape_defaults, step_times, supervised_overrides, table, timed, timed_ours, train_timer)


def heldout_accuracy(model_dir: str, tokenizer_dir: str, pairs_file: str, max_length: int, device: str) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.config import DataConfig, SourceConfig, TokenizerConfig
    from rlhf.data.batching import collate_pairs
    from rlhf.data.formats import tokenize_pairs
    from rlhf.data.sources import read_source
    from rlhf.models import ScalarModel, load_tokenizer, sequence_scores

    tok = load_tokenizer(TokenizerConfig(path=tokenizer_dir))
    pairs, _ = tokenize_pairs(read_source(SourceConfig(path=pairs_file)), tok, DataConfig(max_length=max_length))
    model = ScalarModel(AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32))
    model = model.to(device).eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(pairs), 64):
            b = collate_pairs(pairs[i:i + 64], tok.pad_token_id)
            s = sequence_scores(model, b["input_ids"].to(device), b["attention_mask"].to(device))
            half = s.shape[0] // 2
            correct += int((s[:half] > s[half:]).sum())
    return correct / len(pairs)


def child_ours(spec: dict) -> None:
    from rlhf.config import RMConfig, load_stage_config
    from rlhf.trainers.reward import RewardTrainer

    cfg = load_stage_config(RMConfig, None, supervised_overrides(spec, spec["rm_model"], spec["pairs_train"]))
    trainer = RewardTrainer(cfg)
    trainer.setup()
    trainer.resume()
    pairs = trainer.total_steps * spec["batch"]
    seconds = call_clock(trainer, "train_step", spec)
    dt = timed_ours(spec, trainer)
    trainer.export(trainer.out / "final")
    emit({"pairs_per_s": pairs / dt, "train_s": dt, "pairs": pairs, **step_times(seconds),
          "accuracy": heldout_accuracy(str(trainer.out / "final"), spec["tokenizer"], spec["pairs_eval"],
                                       spec["max_length"], spec["device"])})


def child_trl(spec: dict) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    out = Path(spec["work"]) / f"trl-{time.time_ns()}"
    ds = load_dataset("json", data_files=spec["pairs_train"], split="train")
    ds = ds.remove_columns([c for c in ds.column_names if c not in ("prompt", "chosen", "rejected")])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["rm_model"], dtype=torch.float32, num_labels=1)
    args = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        num_train_epochs=spec["epochs"], learning_rate=spec["lr"], lr_scheduler_type="linear",
        warmup_steps=spec["warmup"], weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, max_length=spec["max_length"], logging_steps=spec["log_every"], save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=spec["device"] == "cpu", bf16=spec["precision"] == "bf16",
        seed=spec["seed"], dataloader_drop_last=True, disable_tqdm=True, disable_dropout=True)
    timer = train_timer(spec)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
    pairs = len(trainer.train_dataset) // spec["batch"] * spec["batch"] * spec["epochs"]
    trainer.train()
    trainer.save_model(str(out / "final"))
    emit({"pairs_per_s": pairs / timer.seconds, "train_s": timer.seconds, "pairs": pairs,
          **step_times(timer.step_seconds),
          "accuracy": heldout_accuracy(str(out / "final"), spec["tokenizer"], spec["pairs_eval"],
                                       spec["max_length"], spec["device"])})


def child_floor(spec: dict) -> None:
    """Our trainer's micro-batches through the bare scalar-head model: the floor of ours' pairs/s."""
    import functools

    import torch
    from transformers import AutoModelForSequenceClassification

    from floor import adamw, floor_metrics, optimizer_step, param_split, stage_batches
    from rlhf.config import RMConfig, load_stage_config
    from rlhf.data.batching import collate_pairs, collate_pairs_shared_prefix
    from rlhf.losses import pairwise_loss
    from rlhf.models import ScalarModel, pair_scores
    from rlhf.trainers.base import setup_frozen

    cfg = load_stage_config(RMConfig, None, supervised_overrides(spec, spec["rm_model"], spec["pairs_train"]))
    collate = (functools.partial(collate_pairs_shared_prefix, pack=cfg.data.packing) if cfg.reward.shared_prefix
               else collate_pairs)
    _, steps = stage_batches("rm", cfg, collate)
    model = ScalarModel(AutoModelForSequenceClassification.from_pretrained(spec["rm_model"], dtype=torch.float32,
                                                                           num_labels=1)).train()
    opt = adamw(model, spec["lr"])
    body, _ = param_split(model)
    batches = [b for mbs in steps for b in mbs]
    pairs = sum(len(b["margin"]) for b in batches)
    flops = sum(6.0 * body * b["input_ids"].numel() for b in batches)

    seconds = []

    def run() -> None:
        for micro_batches in steps:
            t0 = time.perf_counter()
            for b in micro_batches:
                chosen, rejected = pair_scores(model, b, torch.device("cpu"))
                (pairwise_loss(chosen, rejected) / len(micro_batches)).backward()
            optimizer_step(model, opt, 1.0)
            seconds.append(time.perf_counter() - t0)

    with setup_frozen():
        dt = timed(spec, run)
    emit({"pairs_per_s": pairs / dt, "train_s": dt, "pairs": pairs, "steps": len(steps), **step_times(seconds),
          "positions": sum(b["input_ids"].numel() for b in batches), **floor_metrics(flops, dt)})


def main() -> None:
    p = parent_args(__doc__)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 32)")
    p.add_argument("--max-length", type=int, default=None, help="default 48 tiny, 128 real")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 tiny, 1e-5 real")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=8, help="steps on a real model (its training pairs: steps x batch)")
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        {"ours": child_ours, "trl": child_trl, "floor": child_floor}[args.child](spec)
        return
    import torch

    shape_defaults(args, tiny=dict(batch=32, max_length=48, lr=1e-3), real=dict(batch=32, max_length=128, lr=1e-5))
    work, spec, real = prepare_pairs(args, "rm")
    spec.update(work=str(work), epochs=args.epochs, batch=args.batch, max_length=args.max_length, lr=args.lr,
                warmup=1 if real else 10, log_every=50, seed=42, precision=args.precision,
                ours=args.ours, device="cuda" if torch.cuda.is_available() else "cpu")
    keys = ["pairs_per_s", "step_s", "first_step_s", "steps_sum_s", "train_s", "accuracy"]
    who = ("ours", "trl", "floor") if is_real(args) else ("ours", "trl")
    result = compare(__file__, spec, args.repeats, keys, who)
    if "floor" in who:
        keys += floor_gflops(result)
    result["table"] = table(result, keys, "pairs_per_s")
    print(result["table"])
    save(result, args.out)


if __name__ == "__main__":
    main()
