"""PPO: rlhf's PPOTrainer against TRL 1.12's `trl.experimental.ppo.PPOTrainer`, side by side.

Same models (a random-init Llama-style policy, also the reference; a scalar-head model
made from it as both value and reward model), same prompts (the built-in task's), same
response length, rollout batch, PPO epochs and minibatch layout, KL coefficient,
missing-EOS penalty and learning rate, fp32. TRL runs the policy and value model as one
module with one optimizer (its design); ours keeps two engines. Each framework runs in
its own child process, alternately; medians are reported.

Layout per PPO step: 64 prompts, one response each (up to 24 new tokens), 2 PPO epochs,
each one optimizer step on the 64 samples in 2 micro-batches of 32. In TRL's terms:
per_device_train_batch_size 32, gradient_accumulation_steps 2, num_mini_batches 1.

Measured: episodes (prompt + response) per second over the whole training loop
(generation, scoring, updates), and the child's peak RSS.

    python benchmarks/bench_ppo.py --out benchmarks/results/ppo_cpu.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (compare, emit, parent_args, ppo_shape_args, precision_overrides, prepare_ppo, save, table,
                    timed, timed_ours)


def emit_episodes(spec: dict, seconds: float, extra: dict | None = None) -> None:
    episodes = spec["steps"] * spec["rollout"]
    emit({"episodes_per_s": episodes / seconds, "train_s": seconds, "episodes": episodes, **(extra or {})})


def child_ours(spec: dict) -> None:
    from rlhf.config import PPOConfig, load_stage_config
    from rlhf.trainers.ppo import PPOTrainer

    out = Path(spec["work"]) / f"ours-{time.time_ns()}"
    cfg = load_stage_config(PPOConfig, None, [
        f"output_dir={out}", f"tokenizer.path={spec['tokenizer']}", f"policy.model.path={spec['model']}",
        f"value.model.path={spec['rm_model']}", f"reward.model.path={spec['rm_model']}",
        f"data.path={spec['prompts_train']}", f"rollout.batch_size={spec['rollout']}",
        f"rollout.max_new_tokens={spec['response_length']}", f"train.global_batch_size={spec['rollout']}",
        f"train.micro_batch_size={spec['micro']}", f"train.eval_batch_size={spec['rollout']}",
        f"train.max_steps={spec['steps']}", f"ppo.epochs={spec['ppo_epochs']}", "ppo.kl_coef=0.05",
        "ppo.missing_eos_penalty=1.0", f"policy.optim.lr={spec['lr']}", f"value.optim.lr={spec['lr']}",
        "policy.optim.scheduler=linear", "value.optim.scheduler=linear", "sample_every=0",
        "logging.progress_bar=false", *precision_overrides(spec["precision"]), f"seed={spec['seed']}",
        f"train.log_every={1 if spec.get('phases') else spec['steps']}", *spec.get("ours", [])])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    trainer.resume()
    seconds = timed_ours(spec, trainer)
    phases = {}
    if spec.get("phases"):
        # time/generate_s: sampling and the scoring passes; time/train_s: rewards, advantages and updates.
        # Medians over the steps after the first (warm-up).
        import statistics

        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "time/generate_s" in r][1:] or rows
        phases = {k.replace("time/", "") + "_per_step": statistics.median(r[k] for r in rows)
                  for k in ("time/generate_s", "time/train_s")}
    emit_episodes(spec, seconds, phases)


def child_trl(spec: dict) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    out = Path(spec["work"]) / f"trl-{time.time_ns()}"
    tok = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    ds = load_dataset("json", data_files=spec["prompts_train"], split="train")
    ds = ds.map(lambda row: {"input_ids": tok(row["prompt"])["input_ids"]}, remove_columns=ds.column_names)
    dtype = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(spec["rm_model"], dtype=dtype, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_model"], dtype=dtype, num_labels=1)
    args = PPOConfig(
        output_dir=str(out), per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["rollout"] // spec["micro"], num_mini_batches=1,
        num_ppo_epochs=spec["ppo_epochs"], total_episodes=spec["steps"] * spec["rollout"],
        local_rollout_forward_batch_size=spec["rollout"], response_length=spec["response_length"],
        stop_token="eos", temperature=1.0, missing_eos_penalty=1.0, kl_coef=0.05, learning_rate=spec["lr"],
        lr_scheduler_type="linear", num_sample_generations=0, report_to=[], save_strategy="no",
        logging_steps=spec["steps"], use_cpu=spec["device"] == "cpu", bf16=spec["precision"] == "bf16",
        seed=spec["seed"], adam_beta2=0.95, disable_tqdm=True)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(64)))
    emit_episodes(spec, timed(spec, trainer.train))


def main() -> None:
    p = parent_args(__doc__)
    ppo_shape_args(p, steps=20)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--phases", action="store_true", help="also report our per-step phase split")
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        (child_ours if args.child == "ours" else child_trl)(spec)
        return
    import torch

    work, spec = prepare_ppo(args)
    spec.update(work=str(work), steps=args.steps, rollout=args.rollout, micro=args.micro,
                ppo_epochs=args.ppo_epochs, response_length=args.response_length, lr=args.lr, seed=42,
                precision=args.precision, ours=args.ours, device="cuda" if torch.cuda.is_available() else "cpu",
                phases=args.phases)
    keys = ["episodes_per_s", "train_s"] + (["generate_s_per_step", "train_s_per_step"] if args.phases else [])
    result = compare(__file__, spec, args.repeats, keys)
    result["table"] = table(result, keys, "episodes_per_s")
    print(result["table"])
    save(result, args.out)


if __name__ == "__main__":
    main()
