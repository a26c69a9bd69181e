"""What every stage script shares: parse `--config CONFIG [key=value ...]`, build, fit.

Under the `deepspeed` launcher each rank runs this with `--local_rank=N`; the rank
layout itself comes from the environment (RANK, WORLD_SIZE, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

from rlhf.config import ConfigError, load_stage_config
from rlhf.data import DataError

# Errors that mean "your input is wrong", reported as one line, not a traceback.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)


def run_stage(trainer_cls, config_cls, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"rlhf {config_cls.stage} stage")
    parser.add_argument("--config", help="YAML config (single- or multi-stage)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_stage_config(config_cls, args.config, args.overrides,
                                world_size=int(os.environ.get("WORLD_SIZE", "1")))
        trainer_cls(cfg).fit()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"[{config_cls.stage}] done", flush=True)
    return 0
