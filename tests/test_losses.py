"""Pure math against values worked out by hand and against slow reference loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.losses import (AdaptiveKLController, FixedKLController, compute_rewards, entropy_from_logits, gae,
                         kl_penalty, last_action_index, lm_loss, logprobs_from_logits, make_kl_controller,
                         masked_mean, masked_whiten, pairwise_loss, policy_loss, reward_centering_loss, value_loss)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(a, expected, atol=1e-6):
    return torch.allclose(a.double(), torch.tensor(expected, dtype=torch.float64), atol=atol)


# --------------------------------------------------------------------------- masked helpers


def test_masked_mean_and_whiten():
    x, m = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3, the 100 is padding
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty mask: 0, not NaN
    w = masked_whiten(x, m)
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1: whitened values -1, 0, 1; padding 0
    assert close(w, [[-1.0, 0.0, 1.0, 0.0]])
    assert close(masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


# --------------------------------------------------------------------------- token log-probs and LM loss


def test_logprobs_and_entropy():
    logits = torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, labels), ref, atol=1e-6)
    # uniform over V = 7: entropy log 7
    assert torch.allclose(entropy_from_logits(torch.zeros(1, 2, 7)), torch.full((1, 2), math.log(7)))


def test_lm_loss_matches_cross_entropy_on_masked_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = t([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    keep = mask[:, 1:].bool()
    ref = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    assert torch.allclose(lm_loss(logits, labels, mask), ref, atol=1e-6)


def test_prompt_tokens_get_no_gradient():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4]])
    lm_loss(logits, labels, t([[0, 0, 1, 1]])).backward()
    # position 0 predicts the prompt token at 1 (masked): no gradient at all there
    assert torch.count_nonzero(logits.grad[0, 0]) == 0 and torch.count_nonzero(logits.grad[0, 1]) > 0
    assert torch.count_nonzero(logits.grad[0, 3]) == 0  # the last position predicts nothing


def test_lm_loss_normalizer_makes_halves_add_up_to_the_whole():
    # Two micro-batches with 1 and 3 targets: each normalised by the total 4, their sum
    # is the loss of the whole batch; per-micro-batch means would weight them wrongly.
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = t([[0, 0, 0, 0, 1], [0, 1, 1, 1, 0]])
    whole = lm_loss(logits, labels, mask)
    halves = lm_loss(logits[:1], labels[:1], mask[:1], 4.0) + lm_loss(logits[1:], labels[1:], mask[1:], 4.0)
    assert torch.allclose(halves, whole, atol=1e-6)
    means = (lm_loss(logits[:1], labels[:1], mask[:1]) + lm_loss(logits[1:], labels[1:], mask[1:])) / 2
    assert not torch.allclose(means, whole, atol=1e-3)


# --------------------------------------------------------------------------- reward model


def test_pairwise_loss_hand_values():
    # equal scores: -log sigmoid(0) = log 2
    assert pairwise_loss(t([1.0]), t([1.0])).item() == pytest.approx(math.log(2))
    # diff 2, margin 2 -> diff 0 -> log 2; diff 1 -> -log sigmoid(1) = log(1 + e^-1) = 0.3133
    assert pairwise_loss(t([3.0]), t([1.0]), t([2.0])).item() == pytest.approx(math.log(2))
    assert pairwise_loss(t([1.0, 0.0]), t([0.0, 1.0])).item() == pytest.approx(
        (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2)
    huge = pairwise_loss(t([1e4, -1e4]), t([-1e4, 1e4]))
    assert torch.isfinite(huge) and huge.item() == pytest.approx(1e4, rel=1e-6)  # (0 + 2e4) / 2
    # centring: ((1 + 2)^2 + (-1 + 0)^2) / 2 = 5
    assert reward_centering_loss(t([1.0, -1.0]), t([2.0, 0.0])).item() == pytest.approx(5.0)


# --------------------------------------------------------------------------- KL and rewards


def test_kl_estimators_hand_values():
    lp, ref = t([[math.log(0.5)]]), t([[math.log(0.25)]])
    # k1 = log 0.5 - log 0.25 = log 2; k2 = (log 2)^2 / 2; k3 with r = 0.25 / 0.5: (0.5 - 1) - log 0.5
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(math.log(2) ** 2 / 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    x, y = torch.randn(50, 9), torch.randn(50, 9)
    assert (kl_penalty(x, y, "k3") >= 0).all() and kl_penalty(x, x, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(x, y, "k4")


def test_last_action_index_from_positions():
    m = t([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    assert last_action_index(m).tolist() == [2, 3, -1, 2]


def test_compute_rewards_score_on_the_last_action_token():
    # rows of length 2, 4 (no EOS, full width) and 1
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    lp = t([[-1.0, -1.0, 9.0, 9.0], [-1.0, -2.0, -1.0, -1.0], [-0.5, 9.0, 9.0, 9.0]])
    ref = t([[-2.0, -1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [-0.5, 0.0, 0.0, 0.0]])
    scores = t([10.0, -3.0, 5.0])
    r = compute_rewards(scores, lp, ref, mask, kl_coef=0.1)
    # row 0: kl (k1) = [1, 0] -> -0.1, 0; the score 10 lands on token 1
    # row 1: kl = [0, -1, 0, 0] -> 0, 0.1, 0, 0; the score -3 on token 3
    # row 2: kl 0; the score 5 on token 0
    assert close(r, [[-0.1, 10.0, 0, 0], [0, 0.1, 0, -3.0], [5.0, 0, 0, 0]])
    clipped = compute_rewards(scores, lp, ref, mask, kl_coef=0.0, clip_score=4.0)
    assert close(clipped, [[0, 4.0, 0, 0], [0, 0, 0, -3.0], [4.0, 0, 0, 0]])
    k3 = compute_rewards(torch.zeros(3), lp, ref, mask, kl_coef=0.5, estimator="k3")
    assert torch.allclose(k3, -0.5 * kl_penalty(lp, ref, "k3") * mask)


# --------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, mask, gamma, lam):
    """The textbook recursion, one row at a time, in float64."""
    B, R = rewards.shape
    adv = torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        idx = [i for i in range(R) if mask[b, i] > 0]
        last = 0.0
        for j in reversed(range(len(idx))):
            i = idx[j]
            next_v = float(values[b, idx[j + 1]]) if j + 1 < len(idx) else 0.0  # no bootstrap past the end
            delta = float(rewards[b, i]) + gamma * next_v - float(values[b, i])
            last = delta + gamma * lam * last
            adv[b, i] = last
    return adv, (adv + values.double()) * mask.double()


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_the_reference_loop(gamma, lam):
    torch.manual_seed(0)
    R = 7
    mask = torch.zeros(5, R)
    mask[0, :] = 1  # full length: never emitted EOS
    mask[1, :3] = 1
    mask[2, :1] = 1
    mask[3, 2:6] = 1  # leading zeros
    mask[4, :5] = 1
    rewards, values = torch.randn(5, R, dtype=torch.float64), torch.randn(5, R, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask.double(), gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-10) and torch.allclose(ret, ref_ret, atol=1e-10)
    # non-zero exactly on the mask; returns = advantages + values there
    assert ((adv != 0) == mask.bool()).all()
    assert torch.allclose(ret[mask.bool()], (adv + values)[mask.bool()])


def test_gae_hand_worked():
    # 3 tokens, gamma = lam = 1: advantage = sum of future rewards - value
    rewards, values, mask = t([[0.0, 0.0, 1.0, 0.0]]), t([[0.5, 0.2, 0.1, 7.0]]), t([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert close(adv, [[0.5, 0.8, 0.9, 0.0]])
    assert close(ret, [[1.0, 1.0, 1.0, 0.0]])


# --------------------------------------------------------------------------- PPO losses


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    lp = t([[-1.0, -2.0, 5.0]])
    adv, mask = t([[1.0, -3.0, 100.0]]), t([[1, 1, 0]])
    loss, stats = policy_loss(lp, lp.clone(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(1.0)  # -(1 - 3) / 2
    assert stats["clipfrac"].item() == 0 and stats["ratio"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.0)


def test_policy_loss_clipping_hand_worked():
    c = 0.2
    old = t([[0.0, 0.0, 0.0, 0.0]])
    new = torch.log(t([[1.5, 0.5, 1.5, 0.5]]))  # ratios 1.5, 0.5, 1.5, 0.5
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 4), c)
    # token 0: A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped branch)
    # token 1: A=+1, r=0.5: max(-0.5, -0.8) = -0.5 (unclipped)
    # token 2: A=-1, r=1.5: max(1.5, 1.2) = 1.5 (unclipped)
    # token 3: A=-1, r=0.5: max(0.5, 0.8) = 0.8 (clipped branch)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # the normalizer divides the sum instead of the token count
    loss2, _ = policy_loss(new, old, adv, torch.ones(1, 4), c, normalizer=2.0)
    assert loss2.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 2)


def test_policy_loss_ignores_garbage_at_padding():
    lp, old, adv = t([[-1.0, -1.5]]), t([[-1.2, -1.1]]), t([[0.7, -0.4]])
    mask = t([[1, 1]])
    base, _ = policy_loss(lp, old, adv, mask, 0.2)
    lp2, adv2 = (torch.cat([x, t([[1e6]])], 1) for x in (lp, adv))
    old2 = torch.cat([old, t([[-1e6]])], 1)  # exp(2e6) would overflow if padding were not masked first
    padded, _ = policy_loss(lp2, old2, adv2, t([[1, 1, 0]]), 0.2)
    assert torch.isfinite(padded) and padded.item() == pytest.approx(base.item())


def test_value_loss_hand_worked():
    old, ret = t([[1.0, 1.0]]), t([[2.0, 0.0]])
    values = t([[1.5, 1.1]])
    loss, stats = value_loss(values, old, ret, torch.ones(1, 2), clip_range=0.2)
    # token 0: V=1.5 clipped to 1.2: max((1.5-2)^2, (1.2-2)^2) = max(0.25, 0.64) = 0.64
    # token 1: V=1.1 inside the clip: (1.1 - 0)^2 = 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["value_error"].item() == pytest.approx((0.25 + 1.21) / 2)


# --------------------------------------------------------------------------- KL controllers


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ada = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada.update(9.0, 1000)  # error 9/6 - 1 = 0.5, clipped to 0.2: 0.1 * (1 + 0.2 * 0.1) = 0.102
    assert ada.value == pytest.approx(0.102)
    ada.update(3.0, 1000)  # error -0.5 -> -0.2: 0.102 * 0.98
    assert ada.value == pytest.approx(0.102 * 0.98)
    ada.update(6.6, 10000)  # error 0.1 over a whole horizon: x 1.1
    assert ada.value == pytest.approx(0.102 * 0.98 * 1.1)
    again = make_kl_controller("adaptive", 1.0, 6.0, 10000)
    again.load_state_dict(ada.state_dict())
    assert again.value == ada.value
    with pytest.raises(ValueError, match="fixed or adaptive"):
        make_kl_controller("pid", 0.1)
