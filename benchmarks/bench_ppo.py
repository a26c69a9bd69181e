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
(generation, scoring, updates), the first step's time and the median of the others
(common.step_times), and the child's peak RSS.

    python benchmarks/bench_ppo.py --out benchmarks/results/ppo_cpu.json

On a real model (`--model smollm2`: policy and reference from SmolLM2, value and reward
from one scalar-head copy of it; 3 steps of 16 prompts in its chat template, up to 32
new tokens, 2 PPO epochs of 2 micro-batches of 8, lr 1e-6), a third child runs the
floor of each pass of a step as bare calls on the same prompt batches: HF `generate`
(its own sampler, exactly 32 new tokens: the most our rollout can draw), the scoring
forwards of policy, reference, value and reward model, and per epoch the policy's and
the value model's forward and backward on each micro-batch, clipping and a fused AdamW
step of each. A PPO step of ours against the sum of those floors (the issue's goal:
within 1.3x), with ours' response widths beside it (below 32, ours did less work than
the floor counts):

    python benchmarks/bench_ppo.py --model smollm2 --repeats 3 --out benchmarks/results/ppo_smollm2_cpu.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import (call_clock, compare, emit, is_real, parent_args, ppo_shape_args, precision_overrides,
                    prepare_ppo, save, step_times, table, timed, timed_ours, train_timer)


def emit_episodes(spec: dict, seconds: float, **extra) -> None:
    episodes = spec["steps"] * spec["rollout"]
    emit({"episodes_per_s": episodes / seconds, "train_s": seconds, "episodes": episodes, **extra})


def ours_config(spec: dict):
    from rlhf.config import PPOConfig, load_stage_config

    out = Path(spec["work"]) / f"ours-{time.time_ns()}"
    return load_stage_config(PPOConfig, None, [
        f"output_dir={out}", f"tokenizer.path={spec['tokenizer']}", f"policy.model.path={spec['model']}",
        f"value.model.path={spec['rm_model']}", f"reward.model.path={spec['rm_model']}",
        f"data.path={spec['prompts_train']}", f"rollout.batch_size={spec['rollout']}",
        f"rollout.max_new_tokens={spec['response_length']}", f"train.global_batch_size={spec['rollout']}",
        f"train.micro_batch_size={spec['micro']}", f"train.eval_batch_size={spec['rollout']}",
        f"train.max_steps={spec['steps']}", f"ppo.epochs={spec['ppo_epochs']}", "ppo.kl_coef=0.05",
        "ppo.missing_eos_penalty=1.0", f"policy.optim.lr={spec['lr']}", f"value.optim.lr={spec['lr']}",
        "policy.optim.scheduler=linear", "value.optim.scheduler=linear", "sample_every=0",
        "logging.progress_bar=false", *precision_overrides(spec["precision"]), f"seed={spec['seed']}",
        f"train.log_every={spec['steps']}", *spec.get("ours", [])])


def child_ours(spec: dict) -> None:
    from rlhf.trainers.ppo import PPOTrainer

    trainer = PPOTrainer(ours_config(spec))
    trainer.setup()
    trainer.resume()
    # Each step's making of experience (generation and scoring) and learning, and how wide
    # the responses were (the floor generates the full response length).
    make_experience, widths = trainer.make_experience, []

    def recording_widths(prompts):
        exp = make_experience(prompts)
        widths.append(exp.response_ids.shape[1])
        return exp

    trainer.make_experience = recording_widths
    experience, learn = call_clock(trainer, "make_experience", spec), call_clock(trainer, "learn", spec)
    seconds = timed_ours(spec, trainer)
    emit_episodes(spec, seconds, **step_times([a + b for a, b in zip(experience, learn)]),
                  experience_s=steady(experience), learn_s=steady(learn), response_widths=widths)


def steady(seconds: list[float]) -> float:
    """The median over the steps after the first (see common.step_times)."""
    return statistics.median(seconds[1:] or seconds)


def child_floor(spec: dict) -> None:
    """Each pass of our PPO step as bare calls, on the same prompt batches: its floor."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from floor import adamw, floor_metrics, optimizer_step, param_split, stage_batches
    from rlhf.data.batching import collate_prompts
    from rlhf.losses import policy_loss, value_loss
    from rlhf.models import ScalarModel, sequence_scores
    from rlhf.rollout import response_logprobs, response_values, torch_linear
    from rlhf.tokens import stop_token_ids
    from rlhf.trainers.base import setup_frozen

    cfg = ours_config(spec)
    tok, steps = stage_batches("ppo", cfg, collate_prompts, spec["steps"])
    steps = [batch for (batch,) in steps]  # one batch of prompts per rollout
    stops = stop_token_ids(tok, spec["model"])
    f32 = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=f32)
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=f32).eval().requires_grad_(False)
    value = ScalarModel(AutoModelForSequenceClassification.from_pretrained(spec["rm_model"], dtype=f32,
                                                                           num_labels=1))
    reward = ScalarModel(AutoModelForSequenceClassification.from_pretrained(
        spec["rm_model"], dtype=f32, num_labels=1)).eval().requires_grad_(False)
    opt_policy, opt_value = adamw(policy, spec["lr"]), adamw(value, spec["lr"])
    body, head = param_split(policy)
    R, micro, epochs = spec["response_length"], spec["micro"], spec["ppo_epochs"]
    seconds: dict[str, list[float]] = {"gen_s": [], "score_s": [], "learn_s": []}
    flops = 0.0

    def clock(key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[key].append(time.perf_counter() - t0)
        return out

    def step(batch: dict) -> None:
        nonlocal flops
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B, P = ids.shape
        policy.eval()
        with torch.no_grad(), torch_linear():
            seq = clock("gen_s", lambda: policy.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=R,
                min_new_tokens=R, eos_token_id=stops, pad_token_id=tok.pad_token_id, use_cache=True))
            full = torch.cat([mask, torch.ones(B, seq.shape[1] - P, dtype=mask.dtype)], 1)

            def score():
                return (response_logprobs(policy, seq, full, P), response_logprobs(ref, seq, full, P),
                        response_values(value, seq, full, P), sequence_scores(reward, seq, full))

            old_logprobs, _, old_values, scores = clock("score_s", score)
        width = R + 1  # positions whose logits are computed, per row
        flops += 2 * 2 * (body * seq.numel() + head * B * width) + 2 * 2 * body * seq.numel()
        action = torch.ones(B, seq.shape[1] - P)
        advantages = (scores - scores.mean())[:, None].expand_as(action)
        returns = scores[:, None].expand_as(action)
        policy.train()

        def learn():
            for _ in range(epochs):
                for i in range(0, B, micro):
                    s, m, a = seq[i:i + micro], full[i:i + micro], action[i:i + micro]
                    logprobs, _ = response_logprobs(policy, s, m, P, with_entropy=True)
                    loss, _ = policy_loss(logprobs, old_logprobs[i:i + micro], advantages[i:i + micro], a, 0.2,
                                          action.sum())
                    loss.backward()
                    values = response_values(value, s, m, P)
                    loss, _ = value_loss(values, old_values[i:i + micro], returns[i:i + micro], a, 0.2,
                                         action.sum())
                    loss.backward()
                optimizer_step(policy, opt_policy, 1.0)
                optimizer_step(value, opt_value, 1.0)

        clock("learn_s", learn)
        flops += epochs * (6 * (body * seq.numel() + head * B * width) + 6 * body * seq.numel())

    with setup_frozen():
        for batch in steps:
            step(batch)
    per_step = [sum(x) for x in zip(*seconds.values())]
    total = sum(per_step)
    emit({**step_times(per_step), **{k: steady(v) for k, v in seconds.items()},
          "experience_s": steady([g + s for g, s in zip(seconds["gen_s"], seconds["score_s"])]),
          "train_s": total, "episodes_per_s": len(steps) * spec["rollout"] / total,
          **floor_metrics(flops, sum(seconds["score_s"]) + sum(seconds["learn_s"]))})


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
    timer = train_timer(spec)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(64)), callbacks=[timer])
    emit_episodes(spec, timed(spec, trainer.train), **step_times(timer.step_seconds))


def main() -> None:
    p = parent_args(__doc__)
    ppo_shape_args(p, steps=20)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 tiny, 1e-6 real")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--phases", action="store_true",
                   help="also report our per-step split: making experience (generation, scoring), learning")
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        {"ours": child_ours, "trl": child_trl, "floor": child_floor}[args.child](spec)
        return
    import torch

    work, spec = prepare_ppo(args)
    real = is_real(args)
    spec.update(work=str(work), steps=args.steps, rollout=args.rollout, micro=args.micro,
                ppo_epochs=args.ppo_epochs, response_length=args.response_length,
                lr=args.lr if args.lr is not None else 1e-6 if real else 1e-4, seed=42,
                precision=args.precision, ours=args.ours, device="cuda" if torch.cuda.is_available() else "cpu")
    keys = ["episodes_per_s", "train_s", "step_s", "first_step_s"]
    keys += ["experience_s", "learn_s"] if args.phases else []
    if real:
        keys = ["step_s", "first_step_s", "steps_sum_s", "experience_s", "learn_s", "gen_s", "score_s",
                "episodes_per_s", "train_s", "gflops", "matmul_gflops", "of_matmul"]
    result = compare(__file__, spec, args.repeats, keys, ("ours", "trl", "floor") if real else ("ours", "trl"))
    result["table"] = table(result, keys, "episodes_per_s")
    print(result["table"])
    save(result, args.out)


if __name__ == "__main__":
    main()
