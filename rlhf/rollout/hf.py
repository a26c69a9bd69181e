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
    """Sample a response for each prompt row with a causal LM (plain or PEFT): the
    generated ids `(B, R)` (pad after a row's stop token; R is the number of steps run,
    at most `s.max_new_tokens`: decoding ends when every row has stopped) and, with
    `with_logprobs`, their log-probs `(B, R)` (0 after the stop token).

    `s` holds the sampling settings (`max_new_tokens`, `min_new_tokens`, `temperature`,
    `top_k`, `top_p`: a RolloutConfig or evaluate.Sampling); nothing else applies (the
    settings a hub model's generation_config.json carries are not read), since PPO's
    math assumes the responses were drawn from the policy as the config describes.
    Each step's logits go through `SamplingSteps`.

    The loop is the model's forward with its key/value cache, one column a step, as HF
    `generate` runs it (the same tokens: tests/test_grpo_fast.py), with one difference: a row
    that has stopped leaves the batch, its cache rows dropped, so later steps compute
    only the rows still going (`drop_rows`; caches other than HF's dynamic ones keep
    every row, fed pad, as `generate` does). With `group` > 1 (rows `k group .. k group
    + group - 1` are copies of one prompt), the prompts' key/value cache is computed
    once per group and repeated for its rows (`shared_prompt_cache`). Both change only
    the rounding of a batch shape; the random numbers drawn are the same. Attention runs
    without cuDNN's kernel meanwhile (`attention_without_plans`).
    """
    stop_ids = as_stop_ids(stop_ids)
    steps = SamplingSteps(s, stop_ids, pad_id, greedy, with_logprobs)
    forward = DecodingForward(model)
    B, device = prompt_ids.shape[0], prompt_ids.device
    ids, mask, pos, cache = prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask), None
    tokens = torch.full((B, s.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, s.max_new_tokens, device=device) if with_logprobs else None
    rows = torch.arange(B, device=device)  # the batch rows still in the computed batch, in its order
    stopped = torch.zeros(B, dtype=torch.bool, device=device)  # of those, the ones that have stopped
    stop = torch.tensor(stop_ids, device=device)
    width = 0
    with attention_without_plans():
        if group > 1 and prompt_ids.shape[1] > 1:
            cache = shared_prompt_cache(forward, prompt_ids, prompt_mask, group)
            ids, pos = ids[:, -1:], pos[:, -1:]
        for t in range(s.max_new_tokens):
            logits, cache = forward(ids, mask, pos, cache)
            token, logprob = steps(logits, t, rows, B)
            token = token.masked_fill(stopped, pad_id)
            tokens[rows, t] = token
            if with_logprobs:
                logprobs[rows, t] = logprob.masked_fill(stopped, 0.0)
            width = t + 1
            stopped = stopped | torch.isin(token, stop)
            if bool(stopped.all()):
                break
            ids, mask, pos = token[:, None], torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1), pos[:, -1:] + 1
            if drop_rows(cache) and bool(stopped.any()):
                keep = (~stopped).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, ids, mask, pos, stopped = rows[keep], ids[keep], mask[keep], pos[keep], stopped[keep]
    return tokens[:, :width], logprobs[:, :width] if with_logprobs else None


def attention_without_plans():
    """Scaled-dot-product attention without cuDNN's kernel, for decoding (the other
    kernels the process allows stay as they are). On CUDA, torch prefers cuDNN's
    attention where it can run, and cuDNN builds an execution plan for every new
    shape: about 2 ms a layer on an H200, where the whole decoding step of a 1B model
    is 13 ms. Decoding makes new shapes all the time (the cache grows a column a step,
    rows leave the batch), so it paid that on most steps: benchmarks/decoding.py,
    128 rows x 128 tokens, 70.7 ms a step with rows leaving, 16.2 ms with every row
    kept (its shapes repeat from one call to the next). A no-op on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = [b for b, on in ((SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
                               (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
                               (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled())) if on]
    if not allowed:  # the process allows cuDNN's kernel alone: keep it
        return contextlib.nullcontext()
    return sdpa_kernel(allowed + [SDPBackend.OVERRIDEABLE])


class DecodingForward:
    """One decoding step of `sample_responses`: `(ids, mask, positions, cache) -> (the
    last column's logits (B, V), the cache)`, with the keyword names this model's
    forward takes (the cache is `cache` from transformers 5.24, `past_key_values`
    before; `position_ids` and `logits_to_keep` where the family has them, as HF
    `generate` passes them). The first call (cache None) reads the whole prompt."""

    def __init__(self, model):
        self.model = model
        params = inspect.signature(unwrap(model).forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.positions = "position_ids" in params
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def __call__(self, ids, mask, pos, cache):
        kwargs = {"position_ids": pos} if self.positions else {}
        if cache is not None:
            kwargs[self.cache_name] = cache
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs, **self.keep)
        return out.logits[:, -1], getattr(out, self.cache_name)


def drop_rows(cache) -> bool:
    """Whether rows can leave `cache` (`batch_select_indices`) with all of their state:
    HF's dynamic caches, whose every layer holds only keys and values per row
    (DynamicLayer, the sliding-window one included). Other caches (static, hybrid
    linear-attention ones) keep every row."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, DynamicLayer) for layer in layers)


def shared_prompt_cache(forward: DecodingForward, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        group: int):
    """The key/value cache of the prompts' first P - 1 columns, computed (by the model's
    `forward`) on one row per group (rows `k group` of `(B, P)` left-padded prompts)
    and repeated `group` times, so it stands for all B rows. Decoding handed it runs
    only the last prompt column and then the new tokens: a cache must leave at least
    one input column to compute the first token's logits from. Positions restart at
    the first real token. No logits are computed here beyond one column."""
    ids, mask = prompt_ids[::group, :-1], prompt_mask[::group, :-1]
    _, cache = forward(ids, mask, position_ids_from_mask(mask), None)
    cache.batch_repeat_interleave(group)
    return cache


class SamplingSteps:
    """What happens to each step's logits in `sample_responses`:

        record     log_softmax(logits / temperature), when log-probs are asked for
        min_new    every stop token at -inf before min_new_tokens
        no pad     pad at -inf: pad is not a word
        temperature, top-k, top-p   (when sampling; HF's warpers)
        pick       the next token: drawn by `sample_from_scores` (or the argmax when
                   greedy), with its recorded log-prob

    The recorded log-probs are of the policy as it is (before min_new / no pad / top-k
    / top-p), the distribution PPO's forward passes compute, so they stand in for a
    forward pass over the responses: in fp32 equal to it up to rounding.
    """

    def __init__(self, s, stop_ids: list[int], pad_id: int, greedy: bool, with_logprobs: bool):
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        self.temperature = s.temperature if s.temperature else 1.0
        self.min_new_tokens = s.min_new_tokens or 0
        self.stop_ids, self.pad_id, self.greedy, self.with_logprobs = stop_ids, pad_id, greedy, with_logprobs
        self.warpers = []
        if not greedy and s.top_k:
            self.warpers.append(TopKLogitsWarper(s.top_k))
        if not greedy and s.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(s.top_p))

    def __call__(self, logits: torch.Tensor, step: int, rows: torch.Tensor,
                 batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens `(n,)` of step `step` (0-based) for the `n` rows `rows` of a
        `batch`-row batch whose logits `(n, V)` these are, and their log-probs `(n,)`
        (None without `with_logprobs`). A uniform number is drawn for every row of
        the batch, stopped ones included, so the numbers a row gets do not depend on
        which other rows are still going."""
        scores = logits.to(torch.float32, copy=True)  # one copy, which the steps below may write into
        table = torch.log_softmax(scores / self.temperature, dim=-1) if self.with_logprobs else None
        if step < self.min_new_tokens:
            scores[:, self.stop_ids] = float("-inf")
        scores[:, self.pad_id] = float("-inf")
        if self.greedy:
            token = scores.argmax(dim=-1)
        else:
            if self.temperature != 1.0:
                scores = scores / self.temperature
            for warp in self.warpers:
                scores = warp(None, scores)
            uniform = torch.rand(batch, 1, dtype=torch.float64, device=scores.device)[rows]
            token = sample_from_scores(scores, uniform=uniform).squeeze(1)
        return token, table.gather(1, token[:, None]).squeeze(1) if self.with_logprobs else None


def sample_from_scores(scores: torch.Tensor, generator: torch.Generator | None = None,
                       uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token `(B, 1)` per row drawn from softmax(scores), by inverse CDF: a single
    uniform number per row, located in the row's cumulative probabilities. The same
    distribution as `torch.multinomial`, which on the CPU draws an exponential number
    for every vocabulary entry (benchmarks/ppo_sampling.py: PPO's experience step 10%
    faster on a small model). Tokens at -inf are never drawn. `uniform` `(B, 1)`: the
    numbers in [0, 1) to locate, instead of drawing them."""
    cdf = torch.softmax(scores.float(), dim=-1).double().cumsum(dim=-1)
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand(scores.shape[0], 1, dtype=cdf.dtype, device=scores.device, generator=generator)
    u = uniform.to(cdf.dtype) * total
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
