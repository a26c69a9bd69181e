"""Run by tests under the deepspeed launcher: one stage once per ZeRO stage.

    deepspeed --num_gpus 2 tests/dist_run.py STAGE OUT_DIR ZERO_STAGES [override ...]

Each run writes to OUT_DIR/zero<N>. Prints DIST_OK on rank 0 at the end: tests check
that marker rather than only the exit code (a rare exit -6 at gloo teardown was seen
after runs that had finished).
"""

import sys

from rlhf.config import load_stage_config
from rlhf.stages import config_class, trainer_class


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    stage, out, zero_stages, *extra = args
    for z in zero_stages.split(","):
        cfg = load_stage_config(config_class(stage), None, [f"output_dir={out}/zero{z}", f"deepspeed.zero_stage={z}",
                                                            *extra])
        trainer_class(stage)(cfg).fit()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print("DIST_OK", flush=True)
