"""What every stage script shares: parse `--config CONFIG [key=value ...]`, build, fit.

Under the `deepspeed` launcher each rank runs this with `--local_rank=N`; the rank
layout itself comes from the environment (RANK, WORLD_SIZE, ...).

Exit codes, the same from `rlhf STAGE` and `rlhf pipeline`:

    0   the stage finished (final/ is written)
    2   bad input (config, data, output directory): a one-line error, nothing lost
    75  stopped on request (SIGTERM or SIGUSR1) after writing a checkpoint: run the
        same command again to resume (EX_TEMPFAIL: a scheduler may requeue the job)
    76  a peer rank died or stalled past train.collective_timeout_minutes: the last
        complete checkpoint is intact; run the same command again to resume
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from rlhf.config import ConfigError, load_stage_config
from rlhf.data import DataError

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76

# Errors that mean "your input is wrong", reported as one line, not a traceback.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)


def run_named(stage: str, argv: list[str] | None = None) -> int:
    """Run the stage of that name in rlhf.stages' registry."""
    from rlhf.stages import REGISTRY

    return run_stage(REGISTRY[stage].trainer_class(), REGISTRY[stage].config, argv)


def run_stage(trainer_cls, config_cls, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"rlhf {config_cls.stage} stage")
    parser.add_argument("--config", help="YAML config (single- or multi-stage)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    from rlhf.trainers.base import STOP_SIGNALS, Preempted  # here: the CLI reads this module's exit codes

    trainer = None
    try:
        cfg = load_stage_config(config_cls, args.config, args.overrides,
                                world_size=int(os.environ.get("WORLD_SIZE", "1")))
        trainer = trainer_cls(cfg)
        trainer.fit()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Preempted:
        return EXIT_PREEMPTED  # the trainer has said so
    except Exception as e:
        # On the way out: the launcher's SIGTERM to the ranks left (when one dies) must
        # not cut this report short.
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        lost = trainer.backbone.collective_failure(e) if trainer is not None else None
        if lost is None:
            raise
        print(f"error: [{config_cls.stage}] {lost}; the last complete checkpoint is intact: run the same command "
              "again to resume", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    print(f"[{config_cls.stage}] done", flush=True)
    return 0
