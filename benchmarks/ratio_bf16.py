"""ppo/ratio_at_start in bf16, with the old log-probs from a forward pass (the default)
and from generation (rollout.logprobs_from_generation=true): how far the cached decode's
rounding moves the first minibatch's new/old ratio off 1.

    python benchmarks/ratio_bf16.py --work /tmp/rlhf-bench2 --steps 3

The PPO benchmark's models; 16 prompts x 12 new tokens per step, one PPO epoch, bf16
with fp32 master weights (ZeRO-1). Prints and saves the ratio logged at each step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host, model_args, precision_overrides, prepare_ppo, save  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    model_args(p)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from rlhf.config import PPOConfig, load_stage_config
    from rlhf.trainers.ppo import PPOTrainer

    _, spec = prepare_ppo(args)
    result = {"host": host()}
    for from_generation in (False, True):
        out = Path(args.work) / f"ratio-bf16-{time.time_ns()}"
        cfg = load_stage_config(PPOConfig, None, [
            f"output_dir={out}", f"tokenizer.path={spec['tokenizer']}", f"policy.model.path={spec['model']}",
            f"value.model.path={spec['rm_model']}", f"reward.model.path={spec['rm_model']}",
            f"data.path={spec['prompts_train']}", "rollout.batch_size=16", "rollout.max_new_tokens=12",
            "train.global_batch_size=16", "train.micro_batch_size=8", f"train.max_steps={args.steps}",
            "ppo.epochs=1", "sample_every=0", "logging.progress_bar=false", "train.log_every=1",
            *precision_overrides("bf16"), f"rollout.logprobs_from_generation={str(from_generation).lower()}"])
        PPOTrainer(cfg).fit()
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        key = "logprobs_from_generation" if from_generation else "logprobs_from_forward"
        result[key] = [r["ppo/ratio_at_start"] for r in rows if "ppo/ratio_at_start" in r]
        print(key, result[key], flush=True)
    save(result, args.out)


if __name__ == "__main__":
    main()
