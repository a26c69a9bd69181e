"""The math of every stage as pure tensor functions: losses, KL, rewards, GAE.

Nothing here reads a config or a trainer attribute; every number arrives as an
argument. Shapes: `B` rows, `T` tokens, `V` vocabulary. Per-token PPO tensors are
`(B, R)` over the response tokens, and `action_mask` is 1 on the response up to and
including the first EOS, 0 after it (see rlhf.rollout for the layout).

Several losses take a `normalizer`: the sum over tokens is divided by it instead
of by this batch's own token count, so that a trainer can divide by the token count
of the whole global batch (all micro-batches, all ranks). Then gradient
accumulation and data parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Number = float | torch.Tensor


# --------------------------------------------------------------------------- masked reductions


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is 1 (over all entries, or along `dim`)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is 1; 0 (not NaN) where the mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked entries (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale `x` to unit variance (and zero mean, with `shift_mean`) over the mask; 0 outside it."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------- token log-probabilities


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, `(B, T, V), (B, T) -> (B, T)`, in float32.

    `gather - logsumexp` instead of `log_softmax().gather()`: the full `(B, T, V)`
    log-softmax is never materialised, which is the peak-memory spot with large
    vocabularies. The caller aligns logits with labels (no shift here).
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, `(B, T, V) -> (B, T)`."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def head_logprobs(hidden: torch.Tensor, head, labels: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = False, chunk_tokens: int = 0,
                  entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(label) `(N,)` in float32 (and the entropy `(N,)` when asked) from the
    hidden states `(N, H)` that the output layer `head` turns into logits, without ever
    holding the logits of more than `chunk_tokens` positions.

    The same numbers as `logprobs_from_logits(head(hidden).float() / temperature, labels)`
    and `entropy_from_logits` of those logits, up to float32 rounding. With gradients
    on, each chunk runs under activation checkpointing: its logits are dropped after the
    forward and recomputed in the backward, so the backward too holds one chunk's
    logits (and their gradient) at a time, for one more pass through the head.

    Args:
        hidden: `(N, H)` positions that predict `labels`, aligned (no shift here).
        head: the output layer, called on `(n, H)` chunks. Pass the module (not its
            weight): calling it is what lets ZeRO-3 gather a partitioned weight and
            LoRA add its adapter.
        labels: `(N,)` token ids.
        temperature: logits are divided by it (the distribution tokens were sampled from).
        with_entropy: also return the entropy at each position (else None).
        chunk_tokens: positions per chunk; 0 (or >= N) computes all at once.
        entropy_grad: with False the entropy is computed outside the autograd graph
            (for logging), so the backward neither keeps nor recomputes its graph.
    """
    n = hidden.shape[0]
    size = chunk_tokens if 0 < chunk_tokens < n else max(n, 1)
    checkpointed = torch.is_grad_enabled() and size < n
    outs = []
    # One split (not slices): its backward writes each chunk's gradient into one
    # (N, H) tensor, instead of a zero-filled (N, H) tensor per chunk.
    for h, y in zip(hidden.split(size), labels.split(size)):
        if checkpointed:
            outs.append(checkpoint(_head_chunk, head, h, y, temperature, with_entropy, entropy_grad,
                                   use_reentrant=False))
        else:
            outs.append(_head_chunk(head, h, y, temperature, with_entropy, entropy_grad))
    logprobs = torch.cat([o[0] for o in outs]) if outs else hidden.new_zeros(0, dtype=torch.float32)
    entropy = (torch.cat([o[1] for o in outs]) if outs else torch.zeros_like(logprobs)) if with_entropy else None
    return logprobs, entropy


def _head_chunk(head, hidden: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool,
                entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lp, ent = _TokenLogprobs.apply(head(hidden), labels, temperature, with_entropy, entropy_grad)
    return lp, ent if with_entropy else lp.new_zeros(0)


class _TokenLogprobs(torch.autograd.Function):
    """log p(label) and the entropy of softmax(logits / temperature), `(n, V) -> (n,), (n,)`,
    in float32 whatever the logits' dtype, with a backward that writes the gradient of
    the logits into one buffer:

        d logp / dz = onehot(label) - p,    dH / dz = -p * (log p + H),    z = logits / T

    Autograd's own graph (float copy, division, logsumexp, gather) keeps or creates
    several `(n, V)` tensors; this keeps the logits and two float32 buffers.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, with_entropy, entropy_grad):
        logprobs, lse, entropy = _token_stats(logits, labels, temperature, with_entropy)
        if with_entropy and not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.temperature = temperature
        ctx.save_for_backward(logits, labels, lse, entropy if entropy_grad else None)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        grad = _logits_grad(logits, labels, lse, entropy, grad_logprobs, grad_entropy, ctx.temperature)
        return grad.to(logits.dtype), None, None, None, None


def _token_stats(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log p(label), logsumexp and (with `with_entropy`) the entropy of softmax(logits / T),
    `(n, V) -> (n,)` each, in float32."""
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:  # H = lse - sum p * z, with p = exp(z - lse)
        entropy = lse - torch.exp(z - lse.unsqueeze(-1)).mul_(z).sum(-1)
    return logprobs, lse, entropy


def _logits_grad(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
                 grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                 T: float, overwrite: bool = False) -> torch.Tensor:
    """d(g_lp . logp + g_H . H) / d logits in float32, `(n, V)`: with z = logits / T,
    d logp / dz = onehot(label) - p and dH / dz = -p * (log p + H). `entropy` None:
    no entropy term. With `overwrite`, float32 `logits` are used as a work buffer."""
    if grad_logprobs is None:
        grad_logprobs = lse.new_zeros(lse.shape)
    if overwrite and logits.dtype == torch.float32:
        logp = (logits.div_(T) if T != 1.0 else logits).sub_(lse.unsqueeze(-1))
    else:
        logp = (logits.float() / T if T != 1.0 else logits.float()) - lse.unsqueeze(-1)
    grad = torch.exp(logp)  # p
    if entropy is not None and grad_entropy is not None:
        # -p * (g_lp + g_H * (log p + H)), in logp's buffer
        coef = logp.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1)).add_(grad_logprobs.unsqueeze(-1))
        grad.mul_(coef).neg_()
    else:
        grad.mul_(-grad_logprobs.unsqueeze(-1))
    del logp
    grad.scatter_add_(-1, labels.unsqueeze(-1), grad_logprobs.unsqueeze(-1))
    if T != 1.0:
        grad.div_(T)
    return grad


class LinearTokenLogprobs(torch.autograd.Function):
    """`head_logprobs` for a linear output layer given as its weight `(V, H)` and bias
    (or None), in one autograd node: the forward and the backward each loop over chunks
    of `chunk_tokens` positions, recomputing a chunk's logits in the backward, so at most
    one chunk's logits exist at a time; the gradients of the hidden states, the weight
    and the bias come out once, summed over the chunks.

    For a layer whose weight must not be used outside one call of its module (ZeRO-3
    gathers a partitioned weight for the call and, for its backward, again): run it as
    that module's forward (rlhf.lm_head), one call however many chunks there are.
    Returns log p `(N,)` and the entropy `(N,)` (None without `with_entropy`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, with_entropy, entropy_grad, chunk_tokens):
        n = hidden.shape[0]
        size = chunk_tokens if 0 < chunk_tokens < n else max(n, 1)
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        for s in range(0, n, size):
            logits = F.linear(hidden[s:s + size], weight, bias)
            lp, chunk_lse, ent = _token_stats(logits, labels[s:s + size], temperature, with_entropy)
            logprobs[s:s + size], lse[s:s + size] = lp, chunk_lse
            if with_entropy:
                entropy[s:s + size] = ent
        if with_entropy and not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.temperature, ctx.size, ctx.has_bias = temperature, size, bias is not None
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy if entropy_grad else None)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        size = ctx.size
        grad_hidden = hidden.new_empty(hidden.shape) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if ctx.has_bias and ctx.needs_input_grad[2] else None
        for s in range(0, hidden.shape[0], size):
            h = hidden[s:s + size]
            grad = _logits_grad(F.linear(h, weight, bias), labels[s:s + size], lse[s:s + size],
                                None if entropy is None else entropy[s:s + size],
                                None if grad_logprobs is None else grad_logprobs[s:s + size],
                                None if grad_entropy is None else grad_entropy[s:s + size],
                                ctx.temperature, overwrite=True).to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[s:s + size])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
            if grad_bias is not None:
                grad_bias.add_(grad.sum(0))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
            normalizer: Number | None = None) -> torch.Tensor:
    """Causal language-model loss on the masked target tokens.

    Args:
        logits: `(B, T, V)` model outputs for the input `labels`.
        labels: `(B, T)` input ids; position t predicts token t + 1.
        loss_mask: `(B, T)` 1 on target tokens that count (aligned with `labels`, so
            `loss_mask[:, 0]` is never used: nothing predicts the first token).
        normalizer: divide the summed NLL by this; default: the number of counted targets.

    Returns:
        Scalar loss: sum of NLL over counted targets / normalizer.
    """
    return nll_loss(logprobs_from_logits(logits[:, :-1], labels[:, 1:]), loss_mask[:, 1:], normalizer)


def nll_loss(logprobs: torch.Tensor, mask: torch.Tensor, normalizer: Number | None = None) -> torch.Tensor:
    """Summed negative log-likelihood of the masked target tokens divided by `normalizer`
    (default: their count). `logprobs`, `mask`: `(B, T)` aligned (target t at column t)."""
    mask = mask.to(logprobs.dtype)
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1)
    return -masked_sum(logprobs, mask) / normalizer


# --------------------------------------------------------------------------- reward model


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                  margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss, mean over pairs of `-log sigmoid(r_chosen - r_rejected - margin)`.

    Args:
        chosen_scores, rejected_scores: `(B,)`.
        margin: `(B,)` or None; a positive margin asks chosen to win by that much
            (Llama 2's margin loss).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()  # logsigmoid: finite for any difference


def reward_centering_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of `(r_chosen + r_rejected)^2`, which keeps scores near zero
    (Eisenstein et al. 2023); the trainer multiplies it by a coefficient."""
    return ((chosen_scores + rejected_scores) ** 2).mean()


# --------------------------------------------------------------------------- KL and rewards

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens, `(B, R)`.

    k1 = logp - logp_ref (unbiased, can be negative); k2 = (logp - logp_ref)^2 / 2;
    k3 = (r - 1) - log r with r = p_ref / p (unbiased and never negative; Schulman,
    "Approximating KL divergence", 2020).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = exp(-log_ratio)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last action token of each row, `(B, R) -> (B,)`; -1 for a row without one.

    From positions only, never from token ids (pad and EOS ids say nothing here).
    """
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)
    last = (positions * action_mask.long()).argmax(-1)
    return torch.where(action_mask.bool().any(-1), last, torch.full_like(last, -1))


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    action_mask: torch.Tensor, kl_coef: float, clip_score: float | None = None,
                    estimator: str = "k1") -> torch.Tensor:
    """Per-token PPO rewards `(B, R)`.

    `-kl_coef * kl` on every action token, plus the sequence score (`(B,)`, clipped to
    `[-clip_score, clip_score]` when given) on the last action token; exactly 0
    outside the mask. A row without action tokens gets no score.
    """
    mask = action_mask.float()
    rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, estimator) * mask
    if clip_score is not None:
        scores = scores.clamp(-clip_score, clip_score)
    last = last_action_index(action_mask)
    has = last >= 0
    rows = torch.arange(scores.shape[0], device=scores.device)[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    The episode ends after the last action token: the value of the state after it is
    0 (no bootstrap from padding). One reverse pass over time, vectorised over rows.

    Args:
        rewards, values: `(B, R)`.
        action_mask: `(B, R)`, a run of 1s per row (rows may differ in length).
        gamma, lam: discount and GAE lambda.

    Returns:
        advantages, returns: `(B, R)`, 0 outside the mask; returns = advantages + values on it.
    """
    mask = action_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        # Outside the mask nothing happens and the running terms are reset, so the
        # token before a masked position sees next value 0: the episode has ended.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        next_value = values[:, t]
        next_adv = adv
    returns = (advantages + values) * mask
    return advantages, returns


# --------------------------------------------------------------------------- PPO losses


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, clip_range: float,
                normalizer: Number | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), per token `max(-A r, -A clip(r, 1-c, 1+c))`.

    Args:
        logprobs: `(B, R)` under the policy being trained (with grad).
        old_logprobs: `(B, R)` when the responses were sampled.
        advantages: `(B, R)`.
        action_mask: `(B, R)`.
        clip_range: c.
        normalizer: divide the masked token sum by this; default: the number of action
            tokens (a token mean over the batch).

    Returns:
        loss, and detached stats: `clipfrac` (share of action tokens where the clipped
        branch is taken), `approx_kl` (k3 between old and new), `ratio` (mean ratio).
    """
    # the symmetric case of clipped_policy_loss, a token mean: the same arithmetic
    return clipped_policy_loss(logprobs, old_logprobs, advantages, action_mask, clip_range, clip_range,
                               "token_mean", normalizer)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor,
               clip_range: float, normalizer: Number | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, per token `0.5 * max((V - R)^2, (V_clip - R)^2)` with
    `V_clip = V_old + clamp(V - V_old, -c, c)`. Shapes `(B, R)`; `normalizer` as in
    `policy_loss`. Stats: `clipfrac`, `value_error` (mean (V - R)^2)."""
    mask = action_mask.float()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1)
    loss = 0.5 * masked_sum(torch.max(err, err_clipped), mask) / normalizer
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).float(), mask), "value_error": masked_mean(err, mask)}
    return loss, stats


# --------------------------------------------------------------------------- critic-free policy gradients
#
# GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), RLOO (Ahmadian et al. 2024),
# REINFORCE++ (Hu 2025), DAPO (Yu et al. 2025). A rollout batch holds G responses per
# prompt, rows of one prompt consecutive: group k is rows k*G .. k*G+G-1.

ADVANTAGE_METHODS = ("grpo", "dr_grpo", "rloo")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_norm")


def group_advantages(scores: torch.Tensor, group_size: int, method: str = "grpo") -> torch.Tensor:
    """One advantage per response from the scores of its group, `(B,) -> (B,)`, B = groups x G.

    - `grpo`: `(r - mean_g) / (std_g + 1e-4)`, std unbiased (torch's default; a group of
      one has std 0 here, not NaN);
    - `dr_grpo`: `r - mean_g` (no division by the std: Dr. GRPO's fix of its bias);
    - `rloo`: `r_i - mean of the other G-1 scores` (leave-one-out baseline), which is
      `G / (G - 1) * (r_i - mean_g)`; needs G >= 2.
    """
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    r = scores.to(torch.promote_types(scores.dtype, torch.float32)).view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    if method == "grpo":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = (r - mean) / (std + 1e-4)
    elif method == "dr_grpo":
        adv = r - mean
    elif method == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 responses per prompt")
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"unknown advantage method {method!r}; choose one of {', '.join(ADVANTAGE_METHODS)}")
    return adv.view(-1)


def groups_all_equal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(B,)` bool: the rows of groups whose scores are all equal (no learning signal
    for a group baseline; DAPO's dynamic sampling leaves them out)."""
    r = scores.view(-1, group_size)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)
    return same.expand_as(r).reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment `(B,) -> (B,)`, added to the scores: 0 up to
    `max_length - buffer` tokens, then falling linearly to `-factor` at `max_length`
    (and `-factor` beyond it)."""
    start = max_length - buffer
    over = (lengths.float() - start).clamp(min=0) / max(buffer, 1)
    return -factor * over.clamp(max=1.0)


def reinforce_returns(rewards: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Returns `(B, R)` as the reverse cumulative sum of per-token rewards (gamma 1):
    `G_t = sum_{s >= t} r_s` over action tokens; 0 outside the mask."""
    mask = action_mask.to(rewards.dtype)
    r = rewards * mask
    return (r.flip(1).cumsum(1).flip(1)) * mask


def aggregate_loss(per_token: torch.Tensor, action_mask: torch.Tensor, aggregation: str,
                   normalizer: Number | None = None, max_length: int | None = None) -> torch.Tensor:
    """A scalar loss from per-token losses `(B, R)`, as each paper averages:

    - `token_mean` (DAPO): sum over all action tokens / their count;
    - `seq_mean_token_mean` (GRPO paper): each response's token mean, then the mean
      over responses;
    - `seq_sum_norm` (Dr. GRPO): sum over all action tokens / (responses x max_length),
      a constant per response, so long and short responses weigh their tokens alike.

    `normalizer` replaces the count of this batch (action tokens for token_mean,
    responses for the others), so a trainer can divide by the count of the whole global
    minibatch; rows with an empty mask count as no response only through it.
    """
    mask = action_mask.to(per_token.dtype)
    if aggregation == "token_mean":
        total = masked_sum(per_token, mask)
        count = mask.sum()
    elif aggregation == "seq_mean_token_mean":
        total = (masked_sum(per_token, mask, dim=1) / mask.sum(1).clamp(min=1)).sum()
        count = (mask.sum(1) > 0).sum()
    elif aggregation == "seq_sum_norm":
        if max_length is None:
            raise ValueError("seq_sum_norm needs max_length")
        total = masked_sum(per_token, mask) / max_length
        count = (mask.sum(1) > 0).sum()
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")
    if normalizer is None:
        normalizer = count.clamp(min=1)
    return total / normalizer


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        action_mask: torch.Tensor, clip_low: float, clip_high: float, aggregation: str = "token_mean",
                        normalizer: Number | None = None,
                        max_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate with an asymmetric range (DAPO's clip-higher): per token
    `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`, aggregated by `aggregate_loss`.

    Args:
        logprobs, old_logprobs, advantages, action_mask: `(B, R)` (advantages may be
            `(B, 1)` for one value per response).
        clip_low, clip_high: the ratio is clipped to `[1 - clip_low, 1 + clip_high]`.
        aggregation, normalizer, max_length: see `aggregate_loss`.

    Returns:
        loss, and detached token means: `clipfrac`, `approx_kl` (k3, old vs new), `ratio`.
    """
    mask = action_mask.float()
    log_ratio = (logprobs - old_logprobs) * mask  # masked first: garbage at pads cannot overflow exp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.max(unclipped, clipped)
    loss = aggregate_loss(per_token, mask, aggregation, normalizer, max_length)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019's proportional controller: moves the coefficient so the
    measured KL approaches `target`, by at most 20% error per `horizon` episodes."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(kind: str, kl_coef: float, target: float | None = None,
                       horizon: int | None = None) -> FixedKLController:
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("the adaptive KL controller needs a target and a horizon")
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; choose fixed or adaptive")


# --------------------------------------------------------------------------- direct preference optimisation

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(token_logprobs: torch.Tensor, sequence: torch.Tensor, num_sequences: int,
                      average: bool = False) -> torch.Tensor:
    """Per-sequence log-probs `(S,)` from the log-probs of their scored tokens.

    Args:
        token_logprobs: `(N,)` log p of every scored token of the batch, in any order.
        sequence: `(N,)` which sequence (0..S-1) each token belongs to.
        num_sequences: S; a sequence with no token gets 0.
        average: the mean over the sequence's tokens instead of the sum (SimPO's
            length-normalised log-probability, Meng et al. 2024).
    """
    sums = torch.zeros(num_sequences, dtype=token_logprobs.dtype, device=token_logprobs.device)
    sums = sums.index_add(0, sequence, token_logprobs)
    if not average:
        return sums
    counts = torch.bincount(sequence, minlength=num_sequences).clamp(min=1)
    return sums / counts.to(sums.dtype)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, nll_weight: float = 0.0,
             chosen_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation (Rafailov et al. 2023) and its variants, mean over pairs.

    With `h = (pc - rc) - (pr - rr)`, the chosen response's log-ratio to the reference
    minus the rejected one's:

    - `sigmoid`: DPO, `-log sigmoid(beta h)`; with `label_smoothing` ls > 0 conservative
      DPO (Mitchell 2023), which assumes labels are flipped with probability ls:
      `-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)`;
    - `ipo`: IPO (Azar et al. 2023), `(h - 1 / (2 beta))^2`, which regresses h to a fixed
      target instead of pushing it to infinity (the paper's h is on token-averaged
      log-probs: pass averaged log-probs for that).

    With `nll_weight` alpha > 0, RPO (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization"; TRL's rpo_alpha) adds alpha times the chosen response's negative
    log-likelihood per token, `-pc / len(chosen)`: DPO alone only widens the gap, and
    can widen it by pushing both responses' probabilities down (off the reference,
    losing EOS); the NLL term holds the chosen one up.

    Args:
        policy_chosen_logps, policy_rejected_logps: `(B,)` sequence log-probs of the
            responses under the policy (summed or averaged over response tokens).
        ref_chosen_logps, ref_rejected_logps: `(B,)` the same under the reference.
        beta: the KL coefficient (IPO's tau).
        loss_type: `sigmoid` or `ipo`.
        label_smoothing: ls in [0, 0.5), `sigmoid` only.
        nll_weight: alpha >= 0 of the NLL term; 0 is the loss without it.
        chosen_lengths: `(B,)` response tokens of each chosen response, which the NLL
            term divides by; None when the log-probs are already averaged.

    Returns:
        loss, and detached batch means: `reward_accuracy` (share of pairs whose chosen
        implicit reward is strictly above the rejected one's, as TRL counts: a tie is
        wrong), `chosen_reward` and `rejected_reward` (implicit rewards
        `beta * (policy - ref)`), `margin` (chosen minus rejected reward), `chosen_nll`
        (the chosen response's NLL per token, whatever `nll_weight`).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    chosen_nll = -policy_chosen_logps if chosen_lengths is None else -policy_chosen_logps / chosen_lengths
    if nll_weight:
        losses = losses + nll_weight * chosen_nll
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        stats = {
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(),
            "chosen_nll": chosen_nll.mean(),
        }
    return losses.mean(), stats
