"""Run by tests under the deepspeed launcher: several stage runs in one launcher start.

    deepspeed --num_gpus 2 tests/dist_jobs.py JOBS.json

JOBS.json holds a list of [stage, [override, ...]]; each runs to the end in turn
(`Trainer.fit`). Prints DIST_OK on rank 0 once all have finished.
"""

import json
import sys

from dist_run import trainer_class
from rlhf.cli import config_class
from rlhf.config import load_stage_config

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    with open(args[0]) as f:
        jobs = json.load(f)
    for stage, overrides in jobs:
        trainer_class(stage)(load_stage_config(config_class(stage), None, overrides)).fit()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print("DIST_OK", flush=True)
