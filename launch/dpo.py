"""DPO: `deepspeed launch/dpo.py --config CONFIG [key=value ...]`
(or `rlhf dpo CONFIG`, which runs this under the launcher for you)."""

import sys

from launch.common import run_stage
from rlhf.config import DPOConfig
from rlhf.trainers.dpo import DPOTrainer


def main(argv=None) -> int:
    return run_stage(DPOTrainer, DPOConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
