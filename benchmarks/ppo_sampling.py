"""How rollout choices change a PPO step of rlhf's trainer, in one process, on the PPO
benchmark's shapes (64 prompts, 24 new tokens, 2 PPO epochs of 2 micro-batches of 32):

    hf-multinomial   HF generate's own sampler (torch.multinomial), as rlhf had before
    inverse-cdf      rlhf.rollout's sampler (`sample_from_scores`), the default
    + gen-logprobs   the same, and rollout.logprobs_from_generation=true (no forward of
                     the policy to get the old log-probs)

    python benchmarks/ppo_sampling.py --work /tmp/rlhf-bench2 --rounds 8

Every response is exactly 24 tokens (min_new_tokens = max_new_tokens), so all variants
run the same shapes whatever they sample; the variants take turns on one trainer, a
few steps each per round, and the medians over rounds are reported: milliseconds per
step for making experience (generate + scoring passes) and for learning.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host, model_args, ppo_shape_args, prepare_ppo, save  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    model_args(p)
    ppo_shape_args(p, steps=3)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    import rlhf.rollout as rollout
    from rlhf.config import PPOConfig, load_stage_config
    from rlhf.trainers.ppo import PPOTrainer

    _, spec = prepare_ppo(args)
    R = args.response_length
    cfg = load_stage_config(PPOConfig, None, [
        f"output_dir={args.work}/sampling-{time.time_ns()}", f"tokenizer.path={spec['tokenizer']}",
        f"policy.model.path={spec['model']}", f"value.model.path={spec['rm_model']}",
        f"reward.model.path={spec['rm_model']}", f"data.path={spec['prompts_train']}",
        f"rollout.batch_size={args.rollout}", f"rollout.max_new_tokens={R}", f"rollout.min_new_tokens={R}",
        f"train.global_batch_size={args.rollout}", f"train.micro_batch_size={args.micro}",
        f"train.eval_batch_size={args.rollout}", "ppo.epochs=2", "sample_every=0", "logging.progress_bar=false"])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    ours = rollout.sample_responses

    @torch.no_grad()
    def hf_multinomial(model, ids, mask, s, eos_id, pad_id, greedy=False, with_logprobs=False):
        seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=s.temperature,
                             top_k=s.top_k, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                             min_new_tokens=s.min_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                             suppress_tokens=[pad_id], use_cache=True)
        return seq[:, ids.shape[1]:], None

    variants = {"hf-multinomial": (hf_multinomial, False), "inverse-cdf": (ours, False),
                "inverse-cdf + gen-logprobs": (ours, True)}
    prompts = [trainer.data.train[i] for i in range(args.rollout)]
    times: dict[str, dict[str, list[float]]] = {k: {"experience_ms": [], "learn_ms": []} for k in variants}
    names = list(variants)
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in names if r % 2 == 0 else names[::-1]:
            rollout.sample_responses, cfg.rollout.logprobs_from_generation = variants[name]
            exp_s = learn_s = 0.0
            for _ in range(args.steps):
                t0 = time.perf_counter()
                exp = trainer.make_experience(prompts)
                t1 = time.perf_counter()
                exp.rewards = trainer.compute_rewards(exp)
                exp.advantages, exp.returns = trainer.compute_advantages(exp)
                trainer.learn(exp)
                exp_s += t1 - t0
                learn_s += time.perf_counter() - t1
            if r:
                times[name]["experience_ms"].append(exp_s / args.steps * 1e3)
                times[name]["learn_ms"].append(learn_s / args.steps * 1e3)
    rollout.sample_responses = ours
    result = {"median": {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()},
              "rounds": times, "args": vars(args), "host": host()}
    base = result["median"]["hf-multinomial"]
    print("| variant | experience (ms/step) | learn (ms/step) | step vs hf-multinomial |")
    print("|---|---|---|---|")
    for k, m in result["median"].items():
        step = m["experience_ms"] + m["learn_ms"]
        print(f"| {k} | {m['experience_ms']:.1f} | {m['learn_ms']:.1f} | "
              f"{(base['experience_ms'] + base['learn_ms']) / step:.3f}x |")
    save(result, args.out)


if __name__ == "__main__":
    main()
