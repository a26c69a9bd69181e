"""What computing each GRPO group's prompt once would save: a timing sketch, not a feature.

A GRPO batch holds G responses to each prompt, and both rlhf and TRL run every row
`prompt + response` separately, so each prompt goes through the model G times in the
reference pass and in the update. Laid out as one row per group, `prompt, response 1,
..., response G`, each response positioned right after the prompt and masked to see
only the prompt and itself (the reward model's shared-prefix layout,
rlhf.data.batching.collate_pairs_shared_prefix, with G branches instead of two), the
log-probs are the same up to rounding and the model runs B/G x P + B x R tokens instead
of B x (P + R).

This runs SmolLM2-135M's reference pass (body, LM head on the response positions, log
softmax) both ways on random tokens of the one_word batch's shape (8 prompts of ~28
tokens x 8 responses of ~13, bench_grpo.py --model smollm2), checks the log-probs agree
and times each, alternately:

    python benchmarks/grpo_shared_prefix.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import ROOT  # noqa: F401  (puts the repository on sys.path)


def separate(model, prompts: torch.Tensor, responses: torch.Tensor, group: int) -> torch.Tensor:
    """Log-probs `(B*G, R, V)` with each row `prompt + response` run on its own."""
    P = prompts.shape[1]
    ids = torch.cat([prompts.repeat_interleave(group, 0), responses], 1)
    hidden = model.model(input_ids=ids).last_hidden_state[:, P - 1:-1]
    return torch.log_softmax(model.lm_head(hidden).float(), -1)


def shared(model, prompts: torch.Tensor, responses: torch.Tensor, group: int) -> torch.Tensor:
    """The same log-probs from one row per group: the prompt once, then the G responses."""
    B, P = prompts.shape
    R = responses.shape[1]
    T = P + group * R
    ids = torch.cat([prompts, responses.view(B, group * R)], 1)
    positions = torch.cat([torch.arange(P), torch.arange(P, P + R).repeat(group)])
    branch = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, group + 1).repeat_interleave(R)])
    # a token sees earlier tokens of its own branch and the prompt (branch 0)
    mask = (torch.arange(T)[:, None] >= torch.arange(T)[None, :]) & (
        (branch[:, None] == branch[None, :]) | (branch[None, :] == 0))
    hidden = model.model(input_ids=ids, attention_mask=mask[None, None].expand(B, 1, T, T),
                         position_ids=positions[None].expand(B, T)).last_hidden_state
    # the output predicting response token t: the prompt's last position for t = 0, else token t - 1's
    idx = torch.stack([torch.cat([torch.tensor([P - 1]), torch.arange(P + g * R, P + g * R + R - 1)])
                       for g in range(group)]).view(-1)
    return torch.log_softmax(model.lm_head(hidden[:, idx]).float(), -1).view(B * group, R, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/rlhf-bench/models-smollm2/model",
                   help="a causal LM directory (bench_grpo.py --model smollm2 makes this one)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=28)
    p.add_argument("--response-length", type=int, default=13)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    prompts = torch.randint(3, vocab, (args.prompts, args.prompt_length))
    responses = torch.randint(3, vocab, (args.prompts * args.group, args.response_length))
    seconds: dict[str, list[float]] = {"separate": [], "shared": []}
    with torch.no_grad():
        diff = (separate(model, prompts, responses, args.group) - shared(model, prompts, responses, args.group))
        print(f"max |difference| of the log-probs: {diff.abs().max().item():.3g}")
        for _ in range(args.repeats):
            for name, fn in (("separate", separate), ("shared", shared)):
                t0 = time.perf_counter()
                fn(model, prompts, responses, args.group)
                seconds[name].append(time.perf_counter() - t0)
    sep, sh = statistics.median(seconds["separate"]), statistics.median(seconds["shared"])
    print(f"separate rows {sep:.2f} s, one row per group {sh:.2f} s (medians of {args.repeats}): {sep / sh:.2f}x")


if __name__ == "__main__":
    main()
