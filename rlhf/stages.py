"""The stage registry: every stage's name, config class, trainer, data kind and help text.

The CLI, the launch scripts, the pipeline, the data loader and the tests read it, so a
new stage is added here (and in a config section name, rlhf.config.loading.STAGES).
Trainers are named as `module:Class` and imported when asked for: they import
DeepSpeed, and reading a config must not.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from rlhf.config import (STAGES as SECTIONS, DPOConfig, GRPOConfig, PPOConfig, ReinforceConfig, RLOOConfig, RMConfig,
                         SFTConfig)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    trainer: str
    """`module:Class` of the trainer."""
    data: str
    """What the stage's rows are: `sft` (prompt + response), `pairs` (chosen/rejected)
    or `prompts`."""
    split: int
    """Which share of data.stage_split the stage reads (0 SFT, 1 pairs, 2 prompts)."""
    help: str

    def trainer_class(self):
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, Stage] = {s.name: s for s in [
    Stage("sft", SFTConfig, "rlhf.trainers.sft:SFTTrainer", "sft", 0, "supervised fine-tuning"),
    Stage("rm", RMConfig, "rlhf.trainers.reward:RewardTrainer", "pairs", 1, "reward model on ranked pairs"),
    Stage("ppo", PPOConfig, "rlhf.trainers.ppo:PPOTrainer", "prompts", 2, "PPO against the reward sources"),
    Stage("grpo", GRPOConfig, "rlhf.trainers.algorithms:GRPOTrainer", "prompts", 2,
          "GRPO: groups of responses per prompt, no critic"),
    Stage("rloo", RLOOConfig, "rlhf.trainers.algorithms:RLOOTrainer", "prompts", 2,
          "RLOO: leave-one-out baselines, no critic"),
    Stage("reinforce", ReinforceConfig, "rlhf.trainers.algorithms:ReinforceTrainer", "prompts", 2,
          "REINFORCE++: per-token rewards, whitened returns, no critic"),
    Stage("dpo", DPOConfig, "rlhf.trainers.dpo:DPOTrainer", "pairs", 1,
          "direct preference optimisation on ranked pairs"),
]}
STAGES = tuple(REGISTRY)
ON_POLICY = tuple(s for s, st in REGISTRY.items() if st.data == "prompts")
assert set(STAGES) == set(SECTIONS), "rlhf.config.loading.STAGES must name the registry's stages"


def stage(name: str) -> Stage:
    return REGISTRY[name]


def config_class(name: str) -> type:
    return REGISTRY[name].config


def trainer_class(name: str):
    return REGISTRY[name].trainer_class()
