"""One PPO step's model passes on the PPO benchmark's shapes as bare HF/torch calls,
with no trainer around them:

    python benchmarks/ppo_bare.py --work /tmp/rlhf-bench2 --steps 20

Per step (64 prompts, up to 24 new tokens, 2 PPO epochs of 2 micro-batches of 32): HF
`generate` with the KV cache (its own sampler); forwards of the policy, reference, value
and reward models over prompt + response; then per epoch and micro-batch a forward and
backward of the policy and of the value model, and an AdamW step of each. A framework's
episodes/s against this loop's says how much it spends besides these calls. It is not
a lower bound: a framework that does a pass more cheaply (rlhf's inverse-CDF token
draw, log-probs read off generation) runs faster than it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host, model_args, ppo_shape_args, prepare_ppo, save  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    model_args(p)
    ppo_shape_args(p, steps=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.config import TokenizerConfig
    from rlhf.data.batching import pad
    from rlhf.models import load_tokenizer, position_ids_from_mask

    _, spec = prepare_ppo(args)
    tok = load_tokenizer(TokenizerConfig(path=spec["tokenizer"]))
    policy = AutoModelForCausalLM.from_pretrained(spec["model"])
    ref = AutoModelForCausalLM.from_pretrained(spec["model"]).eval()
    value = AutoModelForSequenceClassification.from_pretrained(spec["rm_model"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_model"], num_labels=1).eval()
    opt_p = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    opt_v = torch.optim.AdamW(value.parameters(), lr=1e-4)
    prompts = [json.loads(x)["prompt"] for x in Path(spec["prompts_train"]).read_text().splitlines()]
    R = args.response_length

    def step(k: int) -> None:
        rows = [tok(t)["input_ids"] for t in prompts[k * args.rollout:(k + 1) * args.rollout]]
        ids = pad(rows, tok.pad_token_id, "left")
        mask = pad([[1] * len(r) for r in rows], 0, "left")
        policy.eval()
        with torch.no_grad():
            seq = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=R,
                                  min_new_tokens=R, pad_token_id=tok.pad_token_id, use_cache=True)
            full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - ids.shape[1],
                                                    dtype=mask.dtype)], 1)
            pos = position_ids_from_mask(full_mask)
            for m in (policy, ref):
                m(input_ids=seq, attention_mask=full_mask, position_ids=pos, logits_to_keep=R + 1)
            for m in (value, reward):
                m(input_ids=seq, attention_mask=full_mask, position_ids=pos)
        policy.train()
        for _ in range(2):
            for i in range(0, seq.shape[0], args.micro):
                s, m_, p_ = seq[i:i + args.micro], full_mask[i:i + args.micro], pos[i:i + args.micro]
                logits = policy(input_ids=s, attention_mask=m_, position_ids=p_, logits_to_keep=R + 1).logits
                torch.log_softmax(logits[:, :-1], -1).gather(-1, s[:, -R:, None]).mean().backward()
                value(input_ids=s, attention_mask=m_, position_ids=p_).logits.mean().backward()
            for opt in (opt_p, opt_v):
                opt.step()
                opt.zero_grad()

    step(0)  # warm-up
    t0 = time.perf_counter()
    for k in range(1, args.steps + 1):
        step(k)
    seconds = time.perf_counter() - t0
    result = {"episodes_per_s": args.steps * args.rollout / seconds, "seconds": seconds, "steps": args.steps,
              "host": host()}
    print(json.dumps(result))
    save(result, args.out)


if __name__ == "__main__":
    main()
