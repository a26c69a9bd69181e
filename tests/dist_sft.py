"""Run by tests/test_distributed.py under the deepspeed launcher: SFT with each ZeRO stage.

    deepspeed --num_gpus 2 tests/dist_sft.py OUT_DIR TOKENIZER TRAIN EVAL STAGES [override ...]
"""

import sys

from rlhf.config import SFTConfig, load_stage_config
from rlhf.trainers.sft import SFTTrainer

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, tokenizer, train, ev, stages, *extra = args
    for stage in stages.split(","):
        cfg = load_stage_config(SFTConfig, None, [
            f"output_dir={out}/zero{stage}", f"tokenizer.path={tokenizer}", f"data.path={train}",
            f"data.eval.path={ev}", f"deepspeed.zero_stage={stage}", *extra])
        SFTTrainer(cfg).fit()
    print("DIST_OK", flush=True)
