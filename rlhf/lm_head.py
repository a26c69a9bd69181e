"""Token log-probabilities of a causal LM without its full `(B, T, V)` float32 logits.

At a real vocabulary (128k-152k) the logits are the largest tensors of a training
step: 4 rows x 4k tokens x 128k entries are 8 GB in float32, and today's log-softmax,
its temporaries and its gradient hold several such copies. Here the model runs up to
its output layer; the hidden states of only the positions that are asked about go
through the output layer in chunks (`rlhf.losses.head_logprobs`), so at most one
chunk's logits, of `model.logits_chunk_mib` MiB in float32, exist at a time, in the
forward and in the backward.

The hidden states are the output layer's own input, taken by a hook as the model
calls it (and handed a zero-width slice, so that the model computes no logits). The
model is called as before (the DeepSpeed engine, PEFT, any family), and the output
layer is called as a module (`get_output_embeddings()`, whatever its name) per chunk,
so LoRA adapts it. Under ZeRO-3 each call of a partitioned layer is a collective, and
the ranks hold different numbers of positions: there the chunks run inside the layer's
one call per forward, as its forward for that call (`chunked_logprobs`), with its
gathered weight. Families that change the logits after the
output layer (Gemma 2's soft-capping, Cohere's and Granite's scaling) are not in
`CHUNKED_HEAD_MODEL_TYPES` and take the full-logits path, which computes the same
numbers with the old memory.
"""

from __future__ import annotations

import torch

from rlhf.config import ModelConfig
from rlhf.losses import LinearTokenLogprobs, entropy_from_logits, head_logprobs, logprobs_from_logits
from rlhf.models import unwrap

CHUNKED_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "opt", "gpt_neox", "biogpt"}
"""Families whose forward returns `logits = output_layer(final hidden states)` unchanged
(tests/test_lm_head.py checks the tiny models of the test suite's families)."""


def chunk_tokens(vocab_size: int, chunk_mib: float) -> int:
    """Positions per chunk so that one chunk's float32 logits take `chunk_mib` MiB; 0
    (no chunking) when `chunk_mib` is 0."""
    if chunk_mib <= 0:
        return 0
    return max(1, int(chunk_mib * 2**20) // (4 * vocab_size))


def causal_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor, first: int, select: torch.Tensor | None = None,
                    temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = True,
                    chunk_mib: float = ModelConfig.logits_chunk_mib) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) of the tokens from column `first` on, `(B, T - first)` in float32,
    under a causal LM (HF model, PEFT model or their DeepSpeed engine); and their
    entropy `(B, T - first)` with `with_entropy` (else None).

    Column j is about token `input_ids[:, first + j]`, predicted by the model's output
    at position `first + j - 1`; `first >= 1`. Only the positions where `select`
    (`(B, T - first)`, e.g. a loss mask; None: all) is true go through the output
    layer; the others are 0. Logits are divided by `temperature`. Without `entropy_grad` the
    entropy is computed outside the autograd graph (for logging).
    """
    if first < 1:
        raise ValueError(f"first={first}: the first token has no prediction")
    width = input_ids.shape[1] - first
    targets = input_ids[:, first:]
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  logits_to_keep=width + 1)
    if not chunked_head(model, chunk_mib):
        logits = model(**kwargs).logits[:, :-1].float()
        if temperature != 1.0:
            logits = logits / temperature
        logprobs = logprobs_from_logits(logits, targets)
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                entropy = entropy_from_logits(logits)
        if select is not None:
            logprobs, entropy = logprobs * select, entropy * select if with_entropy else None
        return logprobs, entropy
    if select is not None:
        select = select.bool()

    def pick(hidden):
        hidden = hidden[:, :-1]
        if select is None:  # every position (and no data-dependent shapes, for rlhf.plan's fake tensors)
            return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        return hidden[select], targets[select]

    lp, ent = chunked_logprobs(model, kwargs, pick, temperature, with_entropy, entropy_grad, chunk_mib)
    if select is None:
        return lp.view(targets.shape), ent.view(targets.shape) if with_entropy else None
    logprobs = lp.new_zeros(select.shape).masked_scatter(select, lp)
    entropy = ent.new_zeros(select.shape).masked_scatter(select, ent) if with_entropy else None
    return logprobs, entropy


def picked_logprobs(model, rows: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor,
                    chunk_mib: float = ModelConfig.logits_chunk_mib, **kwargs) -> torch.Tensor:
    """log p(label) `(N,)` in float32 at the output positions `(rows, cols)` of
    `model(**kwargs)` (`cols` counted among the positions `logits_to_keep` keeps), for
    layouts whose targets sit anywhere in the rows (DPO's shared-prefix pairs). Only
    those positions go through the output layer, in chunks as in `causal_logprobs`."""
    if not chunked_head(model, chunk_mib):
        return logprobs_from_logits(model(**kwargs).logits[rows, cols], labels)
    return chunked_logprobs(model, kwargs, lambda hidden: (hidden[rows, cols], labels), chunk_mib=chunk_mib)[0]


def chunked_logprobs(model, kwargs: dict, pick, temperature: float = 1.0, with_entropy: bool = False,
                     entropy_grad: bool = True, chunk_mib: float = ModelConfig.logits_chunk_mib
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(label) `(N,)` in float32 (and the entropy `(N,)` with `with_entropy`) of the
    positions that `pick` takes from the output layer's input in `model(**kwargs)`:
    `pick(hidden (B, K, H)) -> (hidden (N, H), labels (N,))`. The output layer runs over
    chunks of `model.logits_chunk_mib` MiB of logits (`chunked_head(model, chunk_mib)` must hold).

    Under ZeRO-3 the output layer is called once per forward on every rank, as without
    chunking, whatever number of positions each rank holds: the chunks run inside that
    one call (`rlhf.losses.LinearTokenLogprobs` in place of the layer's forward), so
    DeepSpeed gathers its weight once for the forward and once for the backward, and
    reduces its gradient once. Elsewhere the model's own call of the layer computes
    nothing and the layer is called per chunk (`rlhf.losses.head_logprobs`; LoRA on it
    applies).
    """
    hf = unwrap(model)
    chunk = chunk_tokens(hf.config.vocab_size, chunk_mib)
    head = hf.get_output_embeddings()
    if zero3_partitioned(head):
        return _logprobs_inside_head(model, head, kwargs, pick, temperature, with_entropy, entropy_grad, chunk)
    hidden, head = final_hidden_states(model, **kwargs)
    hidden, labels = pick(hidden)
    return head_logprobs(hidden, head, labels, temperature, with_entropy, chunk, entropy_grad)


def _logprobs_inside_head(model, head: torch.nn.Linear, kwargs: dict, pick, temperature: float,
                          with_entropy: bool, entropy_grad: bool, chunk: int):
    """`chunked_logprobs` with the chunks inside the output layer's one call: for this
    forward the layer's `forward` is replaced by one that returns `(N, 1)` log-probs (or
    `(N, 2)` with the entropy), which the model hands back as its logits."""

    def forward(x):
        hidden, labels = pick(x)
        lp, ent = LinearTokenLogprobs.apply(hidden, head.weight, head.bias, labels, temperature, with_entropy,
                                            entropy_grad, chunk)
        return torch.stack([lp, ent], -1) if with_entropy else lp.unsqueeze(-1)

    own = head.__dict__.get("forward")  # an instance attribute (a hook library's wrapper), kept
    head.forward = forward
    try:
        out = model(**kwargs).logits
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    return out[:, 0], out[:, 1] if with_entropy else None


def zero3_partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions any of `module`'s parameters (each call then gathers them)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def chunked_head(model, chunk_mib: float) -> bool:
    """Whether the output layer runs in chunks (`chunked_logprobs`; else the model
    computes all the logits it keeps, as it always did). Under ZeRO-3 only for a plain
    linear layer (not one with LoRA on it): there the chunks must run inside the layer's
    one call per forward, since each call of a partitioned layer is a collective (a
    call per chunk, each rank holding its own number of targets, hung 2-rank runs)."""
    hf = unwrap(model)
    if chunk_mib <= 0 or hf.config.model_type not in CHUNKED_HEAD_MODEL_TYPES:
        return False
    head = hf.get_output_embeddings()
    if head is None:
        return False
    return not zero3_partitioned(head) or type(head) is torch.nn.Linear


def final_hidden_states(model, **kwargs) -> tuple[torch.Tensor, torch.nn.Module]:
    """Call `model(**kwargs)` and return what its output layer was given (the final
    hidden states of the positions `logits_to_keep` keeps, `(B, K, H)`) and that layer.
    The layer itself is handed an empty slice, so no logits are computed."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (LM head)")
    seen: list[torch.Tensor] = []

    def take(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        model(**kwargs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"the output layer of {type(unwrap(model)).__name__} ran {len(seen)} times in one forward")
    return seen[0], head
