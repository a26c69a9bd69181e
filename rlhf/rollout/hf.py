"""The Hugging Face rollout path: generation and the forward passes that turn it into experience.

Token layout of one rollout batch (B rows):

    input_ids      [ pad pad p p p | r r r EOS pad pad ]
                     prompt (P cols, left-padded) | response (R cols)
    attention_mask [  0   0  1 1 1 | 1 1 1  1   0   0  ]
    action_mask                    [ 1 1 1  1   0   0  ]   (R cols)

The action mask covers the response up to and including the first stop token (any
of `stop_ids`: the tokenizer's EOS, the chat template's end-of-turn token, the model's
generation_config EOS ids; see rlhf.tokens.stop_token_ids), found from positions;
padding after it is masked out. Pad differs from every stop token (the tokenizer
loader guarantees it), and the pad token is never sampled.
Every per-token tensor of PPO (`logprobs`, `values`, `rewards`, `advantages`, ...)
has the response's R columns: column t is about response token t, and the model
output that predicts it sits at position P + t - 1.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

from rlhf.config import ModelConfig, RolloutConfig
from rlhf.data.batching import cat_padded
from rlhf.lm_head import causal_logprobs
from rlhf.models import position_ids_from_mask, unwrap


def as_stop_ids(stop_ids: int | list[int]) -> list[int]:
    return [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)


def is_stop(ids: torch.Tensor, stop_ids: int | list[int]) -> torch.Tensor:
    """Boolean mask of the positions of `ids` holding any stop token."""
    return torch.isin(ids, torch.tensor(as_stop_ids(stop_ids), device=ids.device))


def action_mask_from_response(response_ids: torch.Tensor, stop_ids: int | list[int]) -> torch.Tensor:
    """1 on response tokens up to and including the first stop token, 0 after; `(B, R)` long.

    A row without one (it reached max_new_tokens) is all ones.
    """
    R = response_ids.shape[1]
    positions = torch.arange(R, device=response_ids.device).expand_as(response_ids)
    is_eos = is_stop(response_ids, stop_ids)
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, R)).min(dim=1).values
    return (positions <= first_eos[:, None]).long()


def generation_context(engine, zero_stage: int):
    """Decode on torch's own `linear` (see `torch_linear`) and, under ZeRO-3, gather the
    policy's parameters once for a whole rollout batch and lift the per-module fetch
    hooks while generating, instead of gathering every layer for every generated token
    (the slowness DeepSpeed-Chat users reported, DeepSpeedExamples #718). Costs one
    full copy of the weights per rank meanwhile."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch_linear())
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        stack.enter_context(unwrap_model_for_generation(engine))
    return stack


@contextlib.contextmanager
def torch_linear():
    """Use torch's own `linear` for the duration; for passes without backward.

    Once any model is built under ZeRO-3 (`deepspeed.zero.Init`), DeepSpeed replaces
    torch.nn.functional.linear process-wide with an autograd Function that can
    re-gather a weight in backward, and every model in the process pays for it, ZeRO-0
    ones included. Passes without backward (generation, scoring) do not need it; it
    costs about a tenth to a third of a small model's decoding time (measured with
    benchmarks/bench_rollout.py), so they run on the original. A no-op when nothing
    was replaced.
    """
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    current = torch.nn.functional.linear
    if original is None or current is original:
        yield
        return
    torch.nn.functional.linear = original
    try:
        yield
    finally:
        torch.nn.functional.linear = current


@torch.no_grad()
def generate(engine, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: RolloutConfig, tokenizer,
             zero_stage: int, greedy: bool = False, with_logprobs: bool = False,
             stop_ids: list[int] | None = None, group: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sample one response per prompt row with the policy's engine.

    Args:
        engine: the policy's DeepSpeed engine.
        prompt_ids, prompt_mask: `(B, P)`, left-padded.
        cfg: sampling settings.
        greedy: take the most likely token instead of sampling (for tests and comparisons).
        with_logprobs: also return the policy's log-probs of the chosen tokens, read off
            the logits generation computed (see `sample_responses`).
        stop_ids: the tokens that end a response; None: the tokenizer's EOS.
        group: rows `k group .. k group + group - 1` hold copies of one prompt: its
            prefill runs once for them (`sample_responses`). 1: every row on its own.

    Returns:
        response_ids `(B, R)` (pad after the first EOS), action_mask `(B, R)`, with
        R <= cfg.max_new_tokens (generation stops when every row has ended), and the
        log-probs `(B, R)` (0 after the first stop token) or None.
    """
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    was_training = engine.module.training
    engine.module.eval()
    chunk = cfg.micro_batch_size or prompt_ids.shape[0]
    # chunks start at multiples of `chunk`: blocks of gcd(chunk, group) rows stay one prompt's
    group = math.gcd(chunk, group)
    outs = []
    with generation_context(engine, zero_stage):
        for i in range(0, prompt_ids.shape[0], chunk):
            outs.append(sample_responses(engine.module, prompt_ids[i:i + chunk], prompt_mask[i:i + chunk], cfg,
                                         stop_ids, tokenizer.pad_token_id, greedy, with_logprobs, group))
    if was_training:
        engine.module.train()
    response = cat_padded([o[0] for o in outs], tokenizer.pad_token_id)
    response, action_mask = end_at_eos(response, stop_ids, tokenizer.pad_token_id)
    if not with_logprobs:
        return response, action_mask, None
    return response, action_mask, cat_padded([o[1] for o in outs]) * action_mask


@torch.no_grad()
def sample_responses(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, s, stop_ids: int | list[int],
                     pad_id: int, greedy: bool = False, with_logprobs: bool = False,
                     group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One HF `generate` call on a causal LM (plain or PEFT): the generated ids `(B, R)`
    (HF pads rows that ended) and, with `with_logprobs`, their log-probs `(B, R)`.

    `s` holds the sampling settings (`max_new_tokens`, `min_new_tokens`, `temperature`,
    `top_k`, `top_p`: a RolloutConfig or evaluate.Sampling). They are the only ones
    that apply: settings the model's own generation_config.json carries (a hub model's
    repetition_penalty, top_k, ...) are set aside for the call, since PPO's math
    assumes the responses were drawn from the policy as the config describes. Each
    step's logits go through `SamplingSteps`: EOS held back before min_new_tokens, pad
    never chosen, then temperature, top-k and top-p, then one token drawn. Generation
    of a row stops at the first of `stop_ids`.

    With `group` > 1 (rows `k group .. k group + group - 1` are copies of one prompt),
    the prompts' key/value cache is computed once per group and repeated for its rows
    (`shared_prompt_cache`): the prefill reads B / group rows instead of B. Same tokens
    and log-probs up to the rounding of another batch shape.
    """
    from transformers import GenerationConfig

    stop_ids = as_stop_ids(stop_ids)
    steps = SamplingSteps(s, stop_ids, pad_id, prompt_ids.shape[1], greedy, with_logprobs, prompt_ids.device)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=s.max_new_tokens, eos_token_id=stop_ids,
                               pad_token_id=pad_id, use_cache=True)
    cache = {}
    if group > 1 and prompt_ids.shape[1] > 1:
        cache = shared_prompt_cache(model, prompt_ids, prompt_mask, group)
    with own_generation_config(model):
        seq = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg,
                             logits_processor=steps.processors(), **cache)
    return seq[:, prompt_ids.shape[1]:], steps.logprobs()


def shared_prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group: int):
    """The key/value cache of the prompts' first P - 1 columns, computed on one row per
    group (rows `k group` of `(B, P)` left-padded prompts) and repeated `group` times,
    so it stands for all B rows. HF `generate` handed it runs only the last prompt
    column and the new tokens: a cache must leave at least one input column to compute
    the first token's logits from. Positions restart at the first real token, as
    `generate` gives them; no logits are computed here beyond one column. Returns the
    keyword argument for `generate` (`cache` from transformers 5.24, `past_key_values`
    before)."""
    ids, mask = prompt_ids[::group, :-1], prompt_mask[::group, :-1]
    params = inspect.signature(unwrap(model).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True, **keep)
    cache = getattr(out, name)
    cache.batch_repeat_interleave(group)
    return {name: cache}


@contextlib.contextmanager
def own_generation_config(model):
    """A blank generation_config on the model for the duration (token ids kept): HF's
    `generate` fills every setting it is not given from it. Restored afterwards, so an
    exported model keeps its own."""
    from transformers import GenerationConfig

    hf = unwrap(model)
    saved = hf.generation_config
    hf.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
                                            pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        hf.generation_config = saved


class SamplingSteps:
    """What happens to each step's logits in `sample_responses`, as HF logits processors
    run by `generate`'s greedy loop (no processor of HF's own is configured):

        record     log_softmax(logits / temperature), when log-probs are asked for
        min_new    every stop token at -inf before min_new_tokens
        no pad     pad at -inf: pad is not a word
        temperature, top-k, top-p   (when sampling)
        pick       the next token: drawn by `sample_from_scores` (or the argmax when
                   greedy); its recorded log-prob is kept; the scores handed back are
                   -inf except at that token, so HF's argmax takes it

    The recorded log-probs are of the policy as it is (before min_new / no pad / top-k
    / top-p), the distribution PPO's forward passes compute, so they stand in for a
    forward pass over the responses: in fp32 equal to it up to rounding.
    """

    def __init__(self, s, stop_ids: list[int], pad_id: int, prompt_width: int, greedy: bool, with_logprobs: bool,
                 device: torch.device):
        from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                            SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        self.temperature = s.temperature if s.temperature else 1.0
        self.table: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []
        self.with_logprobs = with_logprobs
        steps = [_Call(self.record)] if with_logprobs else []
        if s.min_new_tokens:
            steps.append(MinNewTokensLengthLogitsProcessor(prompt_width, s.min_new_tokens, stop_ids, device=device))
        steps.append(SuppressTokensLogitsProcessor([pad_id], device=device))
        if not greedy:
            if self.temperature != 1.0:
                steps.append(TemperatureLogitsWarper(self.temperature))
            if s.top_k:
                steps.append(TopKLogitsWarper(s.top_k))
            if s.top_p < 1.0:
                steps.append(TopPLogitsWarper(s.top_p))
        steps.append(_Call(self.pick_greedy if greedy else self.pick_sample))
        self.steps = steps

    def processors(self):
        from transformers import LogitsProcessorList

        return LogitsProcessorList(self.steps)

    def record(self, scores: torch.Tensor) -> torch.Tensor:
        self.table = torch.log_softmax(scores / self.temperature, dim=-1)
        return scores

    def pick_sample(self, scores: torch.Tensor) -> torch.Tensor:
        return self.keep(scores, sample_from_scores(scores))

    def pick_greedy(self, scores: torch.Tensor) -> torch.Tensor:
        return self.keep(scores, scores.argmax(dim=-1, keepdim=True))

    def keep(self, scores: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        if self.with_logprobs:
            self.chosen.append(self.table.gather(1, token))
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)

    def logprobs(self) -> torch.Tensor | None:
        return torch.cat(self.chosen, dim=1) if self.with_logprobs else None


class _Call:
    """A logits processor that calls `fn(scores)`."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.fn(scores)


def sample_from_scores(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token `(B, 1)` per row drawn from softmax(scores), by inverse CDF: a single
    uniform number per row, located in the row's cumulative probabilities. The same
    distribution as `torch.multinomial`, which on the CPU draws an exponential number
    for every vocabulary entry (benchmarks/ppo_sampling.py: PPO's experience step 10%
    faster on a small model). Tokens at -inf are never drawn."""
    cdf = torch.softmax(scores.float(), dim=-1).double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(scores.shape[0], 1, dtype=cdf.dtype, device=scores.device, generator=generator) * total
    # cdf is non-decreasing and u < cdf[-1] (the product can round up to it): the first
    # entry above u has probability > 0.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[1] - 1)


def end_at_eos(response_ids: torch.Tensor, stop_ids: int | list[int],
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated `(B, R)` ids -> (ids with pad after the first stop token, action mask):
    whatever generate put after it becomes pad, so the tensors say what the masks say."""
    action_mask = action_mask_from_response(response_ids, stop_ids)
    response_ids = torch.where(action_mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return response_ids, action_mask


def full_sequence(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                  action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and response side by side: input_ids and attention_mask `(B, P + R)`."""
    return torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, action_mask.to(prompt_mask.dtype)], 1)


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                      temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False,
                      chunk_mib: float = ModelConfig.logits_chunk_mib):
    """Log-probabilities `(B, R)` of the response tokens under a causal LM (and their
    entropy `(B, R)` with `with_entropy`; without `entropy_grad` it is computed outside
    the autograd graph, for logging only). Logits are divided by the sampling temperature so that they describe
    the distribution the tokens were drawn from. Only action tokens (the response part
    of `attention_mask`) go through the LM head, `chunk_mib` MiB of float32 logits at a
    time (rlhf.lm_head); other columns are 0. Leave `with_entropy` off unless the
    entropy is used: it costs a pass over every chunk's logits."""
    logprobs, entropy = causal_logprobs(model, input_ids, attention_mask, position_ids_from_mask(attention_mask),
                                        prompt_width, attention_mask[:, prompt_width:], temperature, with_entropy,
                                        entropy_grad, chunk_mib)
    return (logprobs, entropy) if with_entropy else logprobs


def response_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """Values `(B, R)`: column t is the value of the state before response token t."""
    return model(input_ids, attention_mask)[:, prompt_width - 1:-1]
