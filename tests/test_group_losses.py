"""Critic-free policy-gradient math (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO) against
values worked out by hand and against slow reference loops."""

import math
import random

import pytest
import torch

from rlhf.losses import (aggregate_loss, clipped_policy_loss, group_advantages, groups_all_equal, kl_penalty,
                         overlong_penalty, policy_loss, reinforce_returns)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, expected, atol=1e-5):
    return torch.allclose(a.double(), torch.tensor(expected, dtype=torch.float64), atol=atol)


# --------------------------------------------------------------------------- group advantages


def test_group_advantages_by_hand():
    scores = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of 3; the second all tied
    # group 1: mean 2, unbiased std sqrt(((1)^2 + 0 + 1^2) / 2) = 1 -> (r - 2) / (1 + 1e-4)
    d = 1 + 1e-4
    assert close(group_advantages(scores, 3, "grpo"), [-1 / d, 0, 1 / d, 0, 0, 0])
    assert close(group_advantages(scores, 3, "dr_grpo"), [-1, 0, 1, 0, 0, 0])
    # rloo: 1 - mean(2, 3) = -1.5; 2 - mean(1, 3) = 0; 3 - mean(1, 2) = 1.5; ties: 0
    assert close(group_advantages(scores, 3, "rloo"), [-1.5, 0, 1.5, 0, 0, 0])
    # groups of 2: [0, 4]: mean 2, std sqrt((4 + 4) / 1) = 2.828...
    s2 = t([0.0, 4.0])
    assert close(group_advantages(s2, 2, "grpo"), [-2 / (math.sqrt(8) + 1e-4), 2 / (math.sqrt(8) + 1e-4)])
    assert close(group_advantages(s2, 2, "rloo"), [-4.0, 4.0])
    # a group of one: no baseline to compare with, advantage 0 for grpo and dr_grpo
    assert close(group_advantages(t([3.0, -1.0]), 1, "grpo"), [0.0, 0.0])
    with pytest.raises(ValueError, match="rloo needs at least 2"):
        group_advantages(t([1.0]), 1, "rloo")
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="unknown advantage method"):
        group_advantages(scores, 3, "gae")


def reference_group_advantages(scores, G, method):
    out = []
    for k in range(0, len(scores), G):
        g = scores[k:k + G]
        mean = sum(g) / G
        for i, r in enumerate(g):
            if method == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in g) / (G - 1)) if G > 1 else 0.0
                out.append((r - mean) / (std + 1e-4))
            elif method == "dr_grpo":
                out.append(r - mean)
            else:
                out.append(r - sum(g[j] for j in range(G) if j != i) / (G - 1))
    return out


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("G", [2, 3, 5, 8])
def test_group_advantages_match_a_loop(method, G):
    rng = random.Random(G)
    # integer scores: ties within groups happen
    scores = [float(rng.randint(0, 3)) for _ in range(G * 4)]
    got = group_advantages(torch.tensor(scores, dtype=torch.float64), G, method)
    assert torch.allclose(got.double(), torch.tensor(reference_group_advantages(scores, G, method), dtype=torch.float64), atol=1e-5)
    # every group's advantages of grpo, dr_grpo and rloo sum to 0
    assert torch.allclose(got.view(-1, G).sum(1), torch.zeros(4, dtype=got.dtype), atol=1e-4)


def test_groups_all_equal_and_overlong_penalty():
    scores = t([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])
    assert groups_all_equal(scores, 2).tolist() == [True, True, False, False, True, True]
    assert groups_all_equal(scores, 3).tolist() == [False] * 6
    # max 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10
    lengths = torch.tensor([3, 6, 7, 9, 10])
    assert close(overlong_penalty(lengths, 10, 4), [0, 0, -0.25, -0.75, -1.0])
    assert close(overlong_penalty(lengths, 10, 4, factor=2.0), [0, 0, -0.5, -1.5, -2.0])


# --------------------------------------------------------------------------- REINFORCE++ returns


def test_reinforce_returns_by_hand():
    rewards = t([[0.1, -0.2, 1.0, 9.0], [0.5, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # row 1: 0.1 - 0.2 + 1 = 0.9, -0.2 + 1 = 0.8, 1; the 9 is padding; row 2: 0.5
    assert close(reinforce_returns(rewards, mask), [[0.9, 0.8, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])


def test_reinforce_returns_match_a_loop():
    torch.manual_seed(0)
    B, R = 5, 7
    rewards = torch.randn(B, R, dtype=torch.float64)
    lengths = [7, 1, 4, 0, 3]  # different lengths, one empty row
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths], dtype=torch.float64)
    expected = torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        for i in range(lengths[b]):
            expected[b, i] = sum(rewards[b, j] for j in range(i, lengths[b]))
    assert torch.allclose(reinforce_returns(rewards, mask), expected)


# --------------------------------------------------------------------------- loss aggregation and clipping


def test_aggregations_by_hand():
    per_token = t([[1.0, 2.0, 3.0, 7.0], [4.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(2.5)
    # seq_mean_token_mean: (mean(1, 2, 3) = 2, mean(4) = 4) -> 3
    assert aggregate_loss(per_token, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    # seq_sum_norm with max length 4: (6 + 4) / (2 responses x 4) = 1.25
    assert aggregate_loss(per_token, mask, "seq_sum_norm", max_length=4).item() == pytest.approx(1.25)
    # a global normalizer replaces the batch's own count: token_mean over 8 tokens -> 10 / 8
    assert aggregate_loss(per_token, mask, "token_mean", normalizer=8).item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(per_token, mask, "mean")


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
def test_split_batches_with_a_global_normalizer_equal_one_batch(aggregation):
    """Micro-batches (or ranks) that divide by the whole batch's count sum to the loss
    of the whole batch: the gradient-accumulation invariant."""
    torch.manual_seed(1)
    per_token = torch.randn(6, 5, dtype=torch.float64)
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in (5, 2, 3, 1, 4, 5)], dtype=torch.float64)
    whole = aggregate_loss(per_token, mask, aggregation, max_length=5)
    norm = mask.sum() if aggregation == "token_mean" else 6
    parts = sum(aggregate_loss(per_token[i:i + 2], mask[i:i + 2], aggregation, norm, 5) for i in (0, 2, 4))
    assert torch.allclose(parts, whole)


def test_asymmetric_clipping_by_hand():
    old = torch.zeros(1, 3)
    # ratios 0.5, 1.0, 1.5 with advantages +1, -1, +1; range [1 - 0.2, 1 + 0.3] = [0.8, 1.3]
    new = torch.log(t([[0.5, 1.0, 1.5]]))
    adv = t([[1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, stats = clipped_policy_loss(new, old, adv, mask, 0.2, 0.3)
    # token 1: max(-0.5, -0.8) = -0.5 (A > 0, ratio below range: unclipped, pessimistic)
    # token 2: max(1, 1) = 1; token 3: max(-1.5, -1.3) = -1.3 (clipped at 1 + 0.3)
    assert loss.item() == pytest.approx((-0.5 + 1.0 - 1.3) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    # symmetric clipping with token_mean is PPO's policy_loss exactly
    torch.manual_seed(2)
    lp, olp, a = torch.randn(3, 6) * 0.3, torch.randn(3, 6) * 0.3, torch.randn(3, 6)
    m = (torch.rand(3, 6) > 0.3).float()
    assert torch.equal(clipped_policy_loss(lp, olp, a, m, 0.2, 0.2)[0], policy_loss(lp, olp, a, m, 0.2)[0])


def test_clipped_policy_loss_matches_a_loop():
    torch.manual_seed(3)
    B, R, lo, hi = 4, 6, 0.2, 0.28
    lp, olp = torch.randn(B, R, dtype=torch.float64) * 0.4, torch.randn(B, R, dtype=torch.float64) * 0.4
    adv = torch.randn(B, 1, dtype=torch.float64)  # one advantage per response, as GRPO's
    lengths = (6, 2, 4, 1)
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths], dtype=torch.float64)
    per_seq = []
    for b in range(B):
        terms = []
        for i in range(lengths[b]):
            r = math.exp(lp[b, i] - olp[b, i])
            a = adv[b, 0].item()
            terms.append(max(-a * r, -a * min(max(r, 1 - lo), 1 + hi)))
        per_seq.append(terms)
    loss, _ = clipped_policy_loss(lp, olp, adv, mask, lo, hi, "seq_mean_token_mean")
    assert loss.item() == pytest.approx(sum(sum(s) / len(s) for s in per_seq) / B)
    loss, _ = clipped_policy_loss(lp, olp, adv, mask, lo, hi, "token_mean")
    assert loss.item() == pytest.approx(sum(sum(s) for s in per_seq) / sum(lengths))
    loss, _ = clipped_policy_loss(lp, olp, adv, mask, lo, hi, "seq_sum_norm", max_length=R)
    assert loss.item() == pytest.approx(sum(sum(s) for s in per_seq) / (B * R))


def test_k3_kl_in_the_loss_pulls_toward_the_reference():
    """k3 = p_ref/p - log(p_ref/p) - 1 >= 0, zero at the reference; its gradient moves the
    policy's log-prob toward the reference's."""
    ref = t([[-1.0, -2.0]])
    lp = t([[-0.5, -2.0]]).requires_grad_()
    k3 = kl_penalty(lp, ref, "k3")
    # token 1: log_ratio 0.5, r = e^-0.5: 0.60653 - 1 + 0.5 = 0.10653; token 2: 0
    assert close(k3.detach(), [[math.exp(-0.5) - 1 + 0.5, 0.0]])
    k3.sum().backward()
    assert lp.grad[0, 0] > 0 and lp.grad[0, 1] == 0  # descending lowers the log-prob toward -1
