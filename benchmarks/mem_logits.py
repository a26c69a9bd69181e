"""Peak tensor memory of an SFT step, a PPO policy step and a DPO step at a real
vocabulary (152,064, Qwen2's) and 2,048 tokens: the full-logits arithmetic the trainers
used before (commit c6956ff: `lm_loss` on the model's logits; `response_logprobs` with a
full log-softmax for the entropy; DPO's `pair_logprobs` on the logits of its response
positions, which `model.logits_chunk_mib=0` still runs) against the chunked LM head
(rlhf/lm_head.py).

Memory is counted by rlhf.memory.TensorMemory (every tensor storage created, until
freed; fp32 on the CPU). The "loss part" is a step's peak minus the peak of the same
step whose loss reads the final hidden states only (no LM head): what the logits,
the log-softmax and their gradients add. The model body is small (a 2-layer Llama,
hidden 256), so the head dominates as it does at real sizes. Losses and gradients of
the two paths are compared too (max absolute difference).

    python benchmarks/mem_logits.py --out benchmarks/results/mem_logits_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.lm_head import causal_logprobs, final_hidden_states  # noqa: E402
from rlhf.losses import entropy_from_logits, lm_loss, logprobs_from_logits, nll_loss, policy_loss  # noqa: E402
from rlhf.memory import TensorMemory  # noqa: E402
from rlhf.models import position_ids_from_mask  # noqa: E402


def build(vocab: int, hidden: int, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).train()


# --------------------------------------------------------------------------- the steps


def sft_before(model, ids, mask, loss_mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                   logits_to_keep=ids.shape[1]).logits
    return lm_loss(logits, ids, loss_mask)


def sft_after(model, ids, mask, loss_mask, chunk_mib):
    lp, _ = causal_logprobs(model, ids, mask, position_ids_from_mask(mask), 1, loss_mask[:, 1:], chunk_mib=chunk_mib)
    return nll_loss(lp, loss_mask[:, 1:])


def zero3_form(fn):
    """`fn` with the chunks inside the output layer's one call, as under ZeRO-3
    (rlhf.lm_head.chunked_logprobs), here on an unpartitioned model."""
    from unittest import mock

    def run():
        with mock.patch("rlhf.lm_head.zero3_partitioned", return_value=True):
            return fn()
    return run


def ppo_before(model, ids, mask, P, old, adv, temperature=0.7):
    """response_logprobs(with_entropy=True, entropy_grad=False) as the PPO train step called it."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                logits_to_keep=ids.shape[1] - P + 1)
    logits = out.logits[:, :-1].float() / temperature
    lp = logprobs_from_logits(logits, ids[:, P:])
    with torch.no_grad():
        entropy_from_logits(logits)
    return policy_loss(lp, old, adv, mask[:, P:].float(), 0.2)[0]


def ppo_after(model, ids, mask, P, old, adv, chunk_mib, with_entropy=True, temperature=0.7):
    from rlhf.rollout import response_logprobs

    out = response_logprobs(model, ids, mask, P, temperature, with_entropy=with_entropy, chunk_mib=chunk_mib)
    lp = out[0] if with_entropy else out
    return policy_loss(lp, old, adv, mask[:, P:].float(), 0.2)[0]


def dpo_step(model, batch, chunk_mib):
    """One pair (chosen and rejected rows) through `pair_logprobs`, the sigmoid DPO loss
    against fixed reference log-probs."""
    from rlhf.losses import dpo_loss
    from rlhf.trainers.dpo import pair_logprobs

    chosen, rejected = pair_logprobs(model, batch, "cpu", chunk_mib=chunk_mib)
    return dpo_loss(chosen, rejected, chosen.detach() - 1.0, rejected.detach() + 1.0, 0.1)[0]


def body_only(model, ids, mask, first):
    hidden, _ = final_hidden_states(model, input_ids=ids, attention_mask=mask, use_cache=False,
                                    position_ids=position_ids_from_mask(mask), logits_to_keep=ids.shape[1] - first + 1)
    return hidden.sum()


def measure(model, fn):
    """Peak bytes of one forward and backward, the loss, and the gradients."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with TensorMemory() as mem:
        loss = fn()
        loss.backward()
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return mem.peak, loss.item(), grads, seconds


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens in all (rows x length)")
    p.add_argument("--prompt", type=int, default=256, help="PPO: prompt tokens per row")
    p.add_argument("--chunk-mib", type=float, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    model = build(args.vocab, args.hidden, args.layers)
    B, T = args.rows, args.tokens // args.rows
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    loss_mask = torch.ones(B, T, dtype=torch.long)
    loss_mask[:, 0] = 0
    P = args.prompt
    old = torch.randn(B, T - P, generator=g) * 0.1 - 3.0
    adv = torch.randn(B, T - P, generator=g)
    from rlhf.trainers.dpo import collate_dpo

    # DPO: the two rows as one pair (same prompt, different responses), separate rows.
    pair = {"chosen_ids": ids[0].tolist(), "rejected_ids": ids[0, :P].tolist() + ids[1, P:].tolist(),
            "prompt_length": P, "margin": 0.0}
    dpo_batch = collate_dpo([pair], 0, shared_prefix=False)
    results = {"args": vars(args), "steps": {}}
    runs = {
        "sft": {"before": lambda: sft_before(model, ids, mask, loss_mask),
                "after": lambda: sft_after(model, ids, mask, loss_mask, args.chunk_mib),
                "after, ZeRO-3's form": zero3_form(lambda: sft_after(model, ids, mask, loss_mask, args.chunk_mib)),
                "body": lambda: body_only(model, ids, mask, 1)},
        "ppo": {"before": lambda: ppo_before(model, ids, mask, P, old, adv),
                "after": lambda: ppo_after(model, ids, mask, P, old, adv, args.chunk_mib),
                "after, entropy off": lambda: ppo_after(model, ids, mask, P, old, adv, args.chunk_mib, False),
                "after, ZeRO-3's form": zero3_form(lambda: ppo_after(model, ids, mask, P, old, adv, args.chunk_mib)),
                "body": lambda: body_only(model, ids, mask, P)},
        "dpo": {"before": lambda: dpo_step(model, dpo_batch, 0),
                "after": lambda: dpo_step(model, dpo_batch, args.chunk_mib),
                "body": lambda: body_only(model, dpo_batch["input_ids"], dpo_batch["attention_mask"], P)},
    }
    for step, fns in runs.items():
        body = measure(model, fns.pop("body"))[0]
        out = {name: measure(model, fn) for name, fn in fns.items()}
        ref = out["before"]
        rows = {}
        for name, (peak, loss, grads, seconds) in out.items():
            rows[name] = {"peak_mb": peak / 1e6, "loss_part_mb": (peak - body) / 1e6, "loss": loss,
                          "loss_diff": abs(loss - ref[1]), "grad_max_diff": max_diff(grads, ref[2]),
                          "seconds": seconds}
        before = rows["before"]["loss_part_mb"]
        for name, r in rows.items():
            r["loss_part_smaller_by"] = before / r["loss_part_mb"]
            print(f"{step:4s} {name:20s} peak {r['peak_mb']:8.1f} MB  loss part {r['loss_part_mb']:8.1f} MB "
                  f"({r['loss_part_smaller_by']:.1f}x smaller)  loss {r['loss']:.6f} (diff {r['loss_diff']:.1e}, "
                  f"grads {r['grad_max_diff']:.1e})  {r['seconds']:.2f} s", flush=True)
        results["steps"][step] = {"body_peak_mb": body / 1e6, **rows}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
