"""GRPO: `deepspeed launch/grpo.py --config CONFIG [key=value ...]`
(or `rlhf grpo CONFIG`, which runs this under the launcher for you)."""

import sys

from launch.common import run_named


def main(argv=None) -> int:
    return run_named("grpo", argv)


if __name__ == "__main__":
    sys.exit(main())
