"""RLOO: `deepspeed launch/rloo.py --config CONFIG [key=value ...]`
(or `rlhf rloo CONFIG`, which runs this under the launcher for you)."""

import sys

from launch.common import run_named


def main(argv=None) -> int:
    return run_named("rloo", argv)


if __name__ == "__main__":
    sys.exit(main())
