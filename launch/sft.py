"""Supervised fine-tuning: `deepspeed launch/sft.py --config CONFIG [key=value ...]`
(or `rlhf sft CONFIG`, which runs this under the launcher for you)."""

import sys

from launch.common import run_stage
from rlhf.config import SFTConfig
from rlhf.trainers.sft import SFTTrainer


def main(argv=None) -> int:
    return run_stage(SFTTrainer, SFTConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
