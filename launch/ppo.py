"""PPO: `deepspeed launch/ppo.py --config CONFIG [key=value ...]`
(or `rlhf ppo CONFIG`, which runs this under the launcher for you)."""

import sys

from launch.common import run_stage
from rlhf.config import PPOConfig
from rlhf.trainers.ppo import PPOTrainer


def main(argv=None) -> int:
    return run_stage(PPOTrainer, PPOConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
