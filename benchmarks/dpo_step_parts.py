"""Where a DPO step of ours goes at the DPO benchmark's shape, in one process: our
`DPOTrainer.train_step` on one collated batch against the bare HF model's forward (and
forward + backward) on the same batch, and `pair_logprobs` (the model plus our LM-head
and sequence sums), each timed over repeated calls:

    python benchmarks/bench_dpo.py --work /tmp/rlhf-bench2 --repeats 1 --out /tmp/dpo.json
    python benchmarks/dpo_step_parts.py /tmp/dpo.json

The first command makes the model, pairs and spec (kept in its JSON); the second reads
the spec from it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402


def main() -> None:
    import torch

    from rlhf.models import custom_attention_mask
    from rlhf.trainers.dpo import DPOTrainer, pair_logprobs

    spec = json.loads(Path(sys.argv[1]).read_text())["spec"]
    trainer = DPOTrainer(bench_dpo.ours_config(spec))
    trainer.setup()
    trainer.resume()
    trainer.total_steps = 3  # the reference pass and a few steps, so the optimizer has its states
    trainer.train()
    batch = trainer.collate([trainer.data.train[i] for i in range(spec["batch"])])
    model = trainer.policy.module
    ids, pos = batch["input_ids"], batch["position_ids"]
    mask = batch["attention_mask"]
    mask = custom_attention_mask(model, mask) if mask.dim() == 4 else mask

    def model_forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)

    def model_forward_backward():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        logits.float().log_softmax(-1).mean().backward()

    def logprobs_forward_backward():
        chosen, rejected = pair_logprobs(model, batch, "cpu")
        (chosen - rejected).mean().backward()

    parts = {"model forward (no grad)": model_forward, "model forward + backward": model_forward_backward,
             "pair_logprobs forward + backward": logprobs_forward_backward,
             "DPOTrainer.train_step": lambda: trainer.train_step([batch])}
    print(f"batch: {tuple(ids.shape)} ({spec['batch']} pairs)")
    for name, fn in parts.items():
        for _ in range(5):
            fn()
        t0 = time.perf_counter()
        for _ in range(30):
            fn()
        print(f"{name:36s} {(time.perf_counter() - t0) / 30 * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
