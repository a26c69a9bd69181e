"""Profile rlhf's PPO loop (cProfile) on the benchmark's models: where does a step's time go?

    python benchmarks/profile_ppo.py --hidden 512 --layers 8 --heads 8 --rollout 128 --micro 64
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_args, ppo_shape_args, precision_overrides, prepare_ppo  # noqa: E402

p = argparse.ArgumentParser()
model_args(p)
ppo_shape_args(p, steps=6)
p.add_argument("--precision", default="fp32")
args = p.parse_args()

import torch  # noqa: E402

from rlhf.config import PPOConfig, load_stage_config  # noqa: E402
from rlhf.trainers.base import setup_frozen  # noqa: E402
from rlhf.trainers.ppo import PPOTrainer  # noqa: E402

_, spec = prepare_ppo(args)
cfg = load_stage_config(PPOConfig, None, [
    f"output_dir={args.work}/profile-{time.time_ns()}", f"tokenizer.path={spec['tokenizer']}",
    f"policy.model.path={spec['model']}", f"value.model.path={spec['rm_model']}",
    f"reward.model.path={spec['rm_model']}", f"data.path={spec['prompts_train']}",
    f"rollout.batch_size={args.rollout}", f"rollout.max_new_tokens={args.response_length}",
    f"train.global_batch_size={args.rollout}", f"train.micro_batch_size={args.micro}",
    f"train.eval_batch_size={args.rollout}", f"train.max_steps={args.steps}", "ppo.epochs=2", "sample_every=0",
    "logging.progress_bar=false", *precision_overrides(args.precision)])
trainer = PPOTrainer(cfg)
trainer.setup()
trainer.resume()
prof = cProfile.Profile()
prof.enable()
t0 = time.perf_counter()
with setup_frozen():  # as Trainer.fit runs it
    trainer.train()
if torch.cuda.is_available():
    torch.cuda.synchronize()
print(f"train: {time.perf_counter() - t0:.2f} s for {args.steps} steps")
prof.disable()
stats = pstats.Stats(prof)
stats.sort_stats("cumulative").print_stats(r"rlhf/|engine.py:\d+\((step|backward|forward)\)|generate", 25)
stats.sort_stats("tottime").print_stats(15)
