"""DPO: rlhf's DPOTrainer against TRL's DPOTrainer, side by side.

Same starting model (a random-init Llama-style causal LM directory; also the frozen
reference), tokenizer, preference pairs (the built-in task's, explicit prompt), batch
size, epochs, schedule, AdamW settings, beta, sigmoid loss, fp32, dropout off, no
gradient checkpointing. Both append EOS to each response and sum the log-probs of the
response tokens; with this tokenizer TRL's tokenization of prompt + response + EOS as one
string gives the same ids as ours. Each framework at its own defaults otherwise: ours
scores the pairs in the shared-prefix layout and precomputes the reference log-probs in
one pass before training (that pass is timed and counted); TRL scores chosen and
rejected as separate padded rows and runs the reference beside the policy on every batch.
Each framework runs in its own child process, alternately; medians are reported.

Measured: pairs per second over the training loop (ours: plus the reference pass), the
child's peak RSS, and the held-out reward accuracy of the trained policy against the
starting model on the task's held-out pairs (the share of pairs whose chosen response
gained more log-probability than the rejected one), by one function for both.

    python benchmarks/bench_dpo.py --out benchmarks/results/dpo_cpu.json
    python benchmarks/bench_dpo.py --ours dpo.shared_prefix=false    # ablation: pairs as separate rows
    python benchmarks/bench_dpo.py --ours dpo.reference=live          # ablation: a live reference, as TRL

On a real model (`--model smollm2`: 8 steps of 16 of the task's pairs, prompts in
SmolLM2's chat template, policy and reference from SmolLM2, beta 0.1, lr 5e-6), a third
child runs the floor: our trainer's micro-batches (shared prefixes) through the bare
model, first the reference pass over all of them (forward only), then per step the
policy's forward, DPO loss, backward, clipping and a fused AdamW step, giving the
floor's pairs/s and model GFLOP/s, and the 2048-square matmul's GFLOP/s:

    python benchmarks/bench_dpo.py --model smollm2 --repeats 3 --out benchmarks/results/dpo_smollm2_cpu.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (call_clock, compare, emit, floor_gflops, is_real, parent_args, prepare_pairs, save,
                    shape_defaults, step_times, supervised_overrides, table, timed, timed_ours, train_timer)


def heldout_reward_accuracy(policy_dir: str, ref_dir: str, tokenizer_dir: str, pairs_file: str, max_length: int,
                            device: str) -> float:
    """Share of held-out pairs on which the policy's log-ratio to the reference is higher for
    the chosen response than for the rejected one (DPO's reward accuracy), separate rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.config import DataConfig, SourceConfig, TokenizerConfig
    from rlhf.data.formats import tokenize_pairs
    from rlhf.data.sources import read_source
    from rlhf.models import load_tokenizer
    from rlhf.trainers.dpo import collate_dpo, pair_logprobs

    tok = load_tokenizer(TokenizerConfig(path=tokenizer_dir))
    pairs, _ = tokenize_pairs(read_source(SourceConfig(path=pairs_file)), tok, DataConfig(max_length=max_length))
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).to(device).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).to(device).eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(pairs), 64):
            batch = collate_dpo(pairs[i:i + 64], tok.pad_token_id, shared_prefix=False)
            pc, pr = pair_logprobs(policy, batch, device)
            rc, rr = pair_logprobs(ref, batch, device)
            right += int(((pc - rc) > (pr - rr)).sum())
    return right / len(pairs)


def ours_config(spec: dict):
    from rlhf.config import DPOConfig, load_stage_config

    dpo = [f"dpo.beta={spec['beta']}", "eval_sampling.prompts=0"]  # before --ours: an ablation may change them
    return load_stage_config(DPOConfig, None, supervised_overrides({**spec, "ours": dpo + spec["ours"]},
                                                                   spec["model"], spec["pairs_train"]))


def child_ours(spec: dict) -> None:
    from rlhf.trainers.dpo import DPOTrainer

    trainer = DPOTrainer(ours_config(spec))
    trainer.setup()
    trainer.resume()  # with dpo.reference=precompute this scores every pair once: counted below
    pairs = trainer.total_steps * spec["batch"]
    seconds = call_clock(trainer, "train_step", spec)
    dt = timed_ours(spec, trainer) + trainer.reference_time_s
    trainer.export(trainer.out / "final")
    emit({"pairs_per_s": pairs / dt, "train_s": dt, "reference_s": trainer.reference_time_s, "pairs": pairs,
          **step_times(seconds),
          "reward_accuracy": heldout_reward_accuracy(str(trainer.out / "final"), spec["model"], spec["tokenizer"],
                                                     spec["pairs_eval"], spec["max_length"], spec["device"])})


def child_trl(spec: dict) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = Path(spec["work"]) / f"trl-{time.time_ns()}"
    ds = load_dataset("json", data_files=spec["pairs_train"], split="train")
    ds = ds.remove_columns([c for c in ds.column_names if c not in ("prompt", "chosen", "rejected")])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        num_train_epochs=spec["epochs"], learning_rate=spec["lr"], lr_scheduler_type="linear",
        warmup_steps=spec["warmup"], weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, max_length=spec["max_length"], logging_steps=spec["log_every"], save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=spec["device"] == "cpu", bf16=spec["precision"] == "bf16",
        gradient_checkpointing=False, seed=spec["seed"], dataloader_drop_last=True, disable_tqdm=True,
        disable_dropout=True, beta=spec["beta"], loss_type=["sigmoid"])
    timer = train_timer(spec)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
    pairs = len(trainer.train_dataset) // spec["batch"] * spec["batch"] * spec["epochs"]
    trainer.train()
    trainer.save_model(str(out / "final"))
    emit({"pairs_per_s": pairs / timer.seconds, "train_s": timer.seconds, "pairs": pairs,
          **step_times(timer.step_seconds),
          "reward_accuracy": heldout_reward_accuracy(str(out / "final"), spec["model"], spec["tokenizer"],
                                                     spec["pairs_eval"], spec["max_length"], spec["device"])})


def child_floor(spec: dict) -> None:
    """Our trainer's micro-batches through the bare causal LM, the reference pass first: the
    floor of ours' pairs/s (real models)."""
    import functools

    import torch
    from transformers import AutoModelForCausalLM

    from floor import adamw, floor_metrics, optimizer_step, param_split, stage_batches
    from rlhf.losses import dpo_loss
    from rlhf.trainers.base import setup_frozen
    from rlhf.trainers.dpo import collate_dpo, num_pairs, pair_logprobs, response_lengths

    cfg = ours_config(spec)
    d = cfg.dpo
    _, steps = stage_batches("dpo", cfg, functools.partial(collate_dpo, shared_prefix=d.shared_prefix,
                                                           pack=cfg.data.packing))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).train()
    opt = adamw(model, spec["lr"])
    body, head = param_split(model)
    cpu = torch.device("cpu")
    batches = [b for mbs in steps for b in mbs]
    pairs = sum(num_pairs(b) for b in batches)
    # Per pass: the body at every position, the LM head from the first column that predicts
    # a response token (pair_logprobs). The reference's pass is a forward (2 FLOPs per
    # parameter and position), the policy's a forward and backward (6).
    param_positions = sum(body * b["input_ids"].numel()
                          + head * b["input_ids"].shape[0] * (b["input_ids"].shape[1] - int(b["target_cols"].min()))
                          for b in batches)
    reference, seconds = [], []

    def run() -> None:
        with torch.no_grad():
            for b in batches:
                reference.append(pair_logprobs(model, b, cpu, d.length_normalized))
        refs = iter(reference)
        for micro_batches in steps:
            t0 = time.perf_counter()
            for b in micro_batches:
                ref_chosen, ref_rejected = next(refs)
                chosen, rejected = pair_logprobs(model, b, cpu, d.length_normalized)
                lengths = None if d.length_normalized else response_lengths(b)[:num_pairs(b)]
                loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, d.beta, d.loss_type,
                                   d.label_smoothing, d.nll_weight, lengths)
                (loss / len(micro_batches)).backward()
            optimizer_step(model, opt, 1.0)
            seconds.append(time.perf_counter() - t0)

    with setup_frozen():
        dt = timed(spec, run)
    emit({"pairs_per_s": pairs / dt, "train_s": dt, "reference_s": dt - sum(seconds), "pairs": pairs,
          "steps": len(steps), **step_times(seconds), **floor_metrics((2 + 6) * param_positions, dt)})


def main() -> None:
    p = parent_args(__doc__)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 32 tiny, 16 real)")
    p.add_argument("--max-length", type=int, default=None, help="default 48 tiny, 128 real")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 tiny, 5e-6 real")
    p.add_argument("--beta", type=float, default=None, help="default 0.5 tiny, 0.1 real")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=8, help="steps on a real model (its training pairs: steps x batch)")
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        {"ours": child_ours, "trl": child_trl, "floor": child_floor}[args.child](spec)
        return
    import torch

    shape_defaults(args, tiny=dict(batch=32, max_length=48, lr=2e-4, beta=0.5),
                   real=dict(batch=16, max_length=128, lr=5e-6, beta=0.1))
    work, spec, real = prepare_pairs(args, "dpo")
    spec.update(work=str(work), epochs=args.epochs, batch=args.batch, max_length=args.max_length, lr=args.lr,
                beta=args.beta, warmup=1 if real else 10, log_every=50, seed=42, precision=args.precision,
                ours=args.ours, device="cuda" if torch.cuda.is_available() else "cpu")
    keys = ["pairs_per_s", "step_s", "first_step_s", "steps_sum_s", "reference_s", "train_s", "reward_accuracy"]
    who = ("ours", "trl", "floor") if is_real(args) else ("ours", "trl")
    result = compare(__file__, spec, args.repeats, keys, who)
    if "floor" in who:
        keys += floor_gflops(result)
    result["table"] = table(result, keys, "pairs_per_s")
    print(result["table"])
    save(result, args.out)


if __name__ == "__main__":
    main()
