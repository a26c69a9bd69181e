"""REINFORCE++: `deepspeed launch/reinforce.py --config CONFIG [key=value ...]`
(or `rlhf reinforce CONFIG`, which runs this under the launcher for you)."""

import sys

from launch.common import run_named


def main(argv=None) -> int:
    return run_named("reinforce", argv)


if __name__ == "__main__":
    sys.exit(main())
