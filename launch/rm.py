"""Reward model: `deepspeed launch/rm.py --config CONFIG [key=value ...]`
(or `rlhf rm CONFIG`, which runs this under the launcher for you)."""

import sys

from launch.common import run_stage
from rlhf.config import RMConfig
from rlhf.trainers.reward import RewardTrainer


def main(argv=None) -> int:
    return run_stage(RewardTrainer, RMConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
