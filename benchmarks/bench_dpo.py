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
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (compare, emit, model_arch, parent_args, prepare, save, supervised_overrides, table,
                    timed_ours, train_timer)


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


def child_ours(spec: dict) -> None:
    from rlhf.config import DPOConfig, load_stage_config
    from rlhf.trainers.dpo import DPOTrainer

    dpo = [f"dpo.beta={spec['beta']}", "eval_sampling.prompts=0"]  # before --ours: an ablation may change them
    cfg = load_stage_config(DPOConfig, None, supervised_overrides({**spec, "ours": dpo + spec["ours"]}, spec["model"],
                                                                  spec["pairs_train"]))
    trainer = DPOTrainer(cfg)
    trainer.setup()
    trainer.resume()  # with dpo.reference=precompute this scores every pair once: counted below
    pairs = trainer.total_steps * spec["batch"]
    dt = timed_ours(spec, trainer) + trainer.reference_time_s
    trainer.export(trainer.out / "final")
    emit({"pairs_per_s": pairs / dt, "train_s": dt, "reference_s": trainer.reference_time_s, "pairs": pairs,
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
          "reward_accuracy": heldout_reward_accuracy(str(out / "final"), spec["model"], spec["tokenizer"],
                                                     spec["pairs_eval"], spec["max_length"], spec["device"])})


def main() -> None:
    p = parent_args(__doc__)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        (child_ours if args.child == "ours" else child_trl)(spec)
        return
    import torch

    # The starting model: a random-init Llama-style model on the task's tokenizer. A real
    # model (spec["model"], spec["tokenizer"]) plugs in here once real-model loading lands.
    work = Path(args.work) / f"dpo-h{args.hidden}-l{args.layers}"
    spec = prepare(work, model_arch(args.hidden, args.layers, args.heads))
    spec.update(work=str(work), epochs=args.epochs, batch=args.batch, max_length=args.max_length, lr=args.lr,
                beta=args.beta, warmup=10, log_every=50, seed=42, precision=args.precision, ours=args.ours,
                device="cuda" if torch.cuda.is_available() else "cpu")
    keys = ["pairs_per_s", "train_s", "reward_accuracy"]
    result = compare(__file__, spec, args.repeats, keys)
    result["table"] = table(result, keys, "pairs_per_s")
    print(result["table"])
    save(result, args.out)


if __name__ == "__main__":
    main()
