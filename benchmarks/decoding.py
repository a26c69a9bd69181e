"""Our decoding loop (rlhf.rollout.hf.sample_responses) beside HF `generate`, on one device.

A random-init Llama-style model of the given size (bf16 on a GPU, fp32 on the CPU) samples
--rows responses of up to --new-tokens tokens to random prompts of --prompt-length tokens,
with a small vocabulary so that rows end at different steps (a random model draws the stop
token with probability about 1/vocab a step). Timed, each after a warm-up call:

  hf         HF generate (do_sample, its own sampler, no top-k/top-p), every row to the end
             of the longest, fed pad after its stop token;
  ours       sample_responses: rows that stop leave the batch (their cache rows dropped);
  ours-keep  sample_responses with every row kept (rlhf.rollout.hf.drop_rows -> False).

Prints milliseconds per decoding step (column) for each; with --profile, the heaviest
operators of one `ours` call (torch.profiler). The allocator is the process's: run it
once with PYTORCH_CUDA_ALLOC_CONF unset and once with expandable_segments:True.

    python benchmarks/decoding.py --hidden 2048 --intermediate 8192 --layers 16 --heads 32 --kv-heads 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arch_of, save  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--who", default="hf,ours,ours-keep")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import rlhf.rollout.hf as hf
    from rlhf.config import RolloutConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    arch = arch_of(args, max_positions=args.prompt_length + args.new_tokens + 8)
    config = AutoConfig.for_model(**arch, vocab_size=args.vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.rows, args.prompt_length), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(args.rows):  # left padding of different widths, as a rollout batch has
        mask[i, : i % 8] = 0
    ids = ids.masked_fill(mask == 0, 0).to(device)
    mask = mask.to(device)
    keep_rows = hf.drop_rows

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run(who: str, new_tokens: int) -> int:
        with torch.no_grad():
            if who == "hf":
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                                     top_k=0, top_p=1.0, temperature=1.0, eos_token_id=2, pad_token_id=0)
                return out.shape[1] - ids.shape[1]
            hf.drop_rows = keep_rows if who == "ours" else (lambda cache: False)
            cfg = RolloutConfig(max_new_tokens=new_tokens, temperature=1.0)
            tokens, _ = hf.sample_responses(model, ids, mask, cfg, [2], 0)
            hf.drop_rows = keep_rows
            return tokens.shape[1]

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args),
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "torch": torch.__version__}
    for who in args.who.split(","):
        run(who, 8)
        sync()
        torch.manual_seed(2)
        t0 = time.perf_counter()
        steps = run(who, args.new_tokens)
        sync()
        seconds = time.perf_counter() - t0
        result[who] = {"s": seconds, "steps": steps, "ms_per_step": 1000 * seconds / steps}
        print(f"{who:10s} {seconds:7.3f} s  {steps} steps  {1000 * seconds / steps:7.2f} ms a step", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            run("ours", min(args.new_tokens, 64))
            sync()
        if device == "cuda":
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, dict) and "s" in v}))
    save(result, args.out)


if __name__ == "__main__":
    main()
