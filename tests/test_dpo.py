"""DPO: the loss against hand-worked values, the pair layouts' log-probs, and a tiny model
that learns, with the invariants every stage keeps (accumulation, resume, ranks, LoRA)."""

import math

import pytest
import torch

from rlhf.losses import dpo_loss, sequence_logprobs


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# --------------------------------------------------------------------------- the loss

# Two pairs. Pair 1: the policy raised chosen (-1.5 -> -1) and lowered rejected (-1.5 -> -2):
# log-ratios +0.5 and -0.5, h = 1. Pair 2: chosen fell (-2 -> -3), rejected stayed (-1):
# log-ratios -1 and 0, h = -1.
PC, PR, RC, RR = t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -1.0])


def test_dpo_sigmoid_by_hand():
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.1)
    # pair 1: -log sigmoid(0.1) = log(1 + e^-0.1) = log 1.904837 = 0.6443967
    # pair 2: -log sigmoid(-0.1) = log(1 + e^0.1) = log 2.105171 = 0.7443967;  mean 0.6943967
    assert loss.item() == pytest.approx(0.6943967, abs=1e-6)
    # implicit rewards beta * log-ratio: chosen (0.05, -0.1), rejected (-0.05, 0)
    assert stats["chosen_reward"].item() == pytest.approx(-0.025, abs=1e-7)
    assert stats["rejected_reward"].item() == pytest.approx(-0.025, abs=1e-7)
    assert stats["margin"].item() == pytest.approx(0.0, abs=1e-7)  # margins (0.1, -0.1)
    assert stats["reward_accuracy"].item() == 0.5  # pair 1 right, pair 2 wrong


def test_dpo_gradient_by_hand():
    pc = PC.clone().requires_grad_()
    pr = PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.1)[0].backward()
    # d/dpc of -log sigmoid(beta h) = -beta sigmoid(-beta h), halved by the mean over 2 pairs:
    # pair 1: -0.1 * sigmoid(-0.1) / 2 = -0.1 * 0.4750208 / 2 = -0.02375104
    # pair 2: -0.1 * sigmoid(0.1) / 2 = -0.1 * 0.5249792 / 2 = -0.02624896
    assert torch.allclose(pc.grad, t([-0.02375104, -0.02624896]), atol=1e-7)
    assert torch.allclose(pr.grad, -pc.grad)  # h falls as pr rises


def test_conservative_dpo_by_hand():
    # pair 1 alone (h = 1), ls = 0.25:
    # 0.75 * -log sigmoid(0.1) + 0.25 * -log sigmoid(-0.1) = 0.75 * 0.6443967 + 0.25 * 0.7443967 = 0.6693967
    loss, _ = dpo_loss(PC[:1], PR[:1], RC[:1], RR[:1], beta=0.1, label_smoothing=0.25)
    assert loss.item() == pytest.approx(0.6693967, abs=1e-6)
    # ls = 0 is plain DPO
    assert dpo_loss(PC, PR, RC, RR, 0.1, label_smoothing=0.0)[0] == dpo_loss(PC, PR, RC, RR, 0.1)[0]


def test_ipo_by_hand():
    # beta 0.5: target 1 / (2 * 0.5) = 1. Pair 1: (1 - 1)^2 = 0; pair 2: (-1 - 1)^2 = 4. Mean 2.
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    assert stats["margin"].item() == pytest.approx(0.0, abs=1e-7)  # 0.5 * (1, -1)
    # beta 0.1: target 5. (1 - 5)^2 = 16, (-1 - 5)^2 = 36. Mean 26.
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(26.0, abs=1e-5)
    pc = PC.clone().requires_grad_()
    dpo_loss(pc, PR, RC, RR, beta=0.5, loss_type="ipo")[0].backward()
    # d/dpc (h - 1)^2 / 2 = (h - 1): pair 1 0, pair 2 -2
    assert torch.allclose(pc.grad, t([0.0, -2.0]), atol=1e-6)


def test_dpo_loss_matches_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    x = [-10 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4)]
    for loss_type, beta, ls in [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.1), ("ipo", 0.2, 0.0)]:
        loss, stats = dpo_loss(*x, beta=beta, loss_type=loss_type, label_smoothing=ls)
        total, right = 0.0, 0
        for pc, pr, rc, rr in zip(*(v.tolist() for v in x)):
            h = (pc - rc) - (pr - rr)
            if loss_type == "sigmoid":
                total += -(1 - ls) * math.log(1 / (1 + math.exp(-beta * h))) \
                    - ls * math.log(1 / (1 + math.exp(beta * h)))
            else:
                total += (h - 1 / (2 * beta)) ** 2
            right += beta * (pc - rc) > beta * (pr - rr)
        assert loss.item() == pytest.approx(total / 16, rel=1e-10)
        assert stats["reward_accuracy"].item() == right / 16


def test_dpo_loss_refuses_unknown_settings():
    with pytest.raises(ValueError, match="unknown DPO loss type 'hinge'"):
        dpo_loss(PC, PR, RC, RR, 0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(PC, PR, RC, RR, 0.1, loss_type="ipo", label_smoothing=0.1)


def test_sequence_logprobs_sum_and_average():
    tokens, seq = t([-1.0, -2.0, -3.0, -4.0]), torch.tensor([0, 1, 0, 2])
    # sequence 0: -1 - 3 = -4 over 2 tokens; 1: -2 (1 token); 2: -4 (1 token); 3: no token, 0
    assert torch.equal(sequence_logprobs(tokens, seq, 4), t([-4.0, -2.0, -4.0, 0.0]))
    assert torch.equal(sequence_logprobs(tokens, seq, 4, average=True), t([-2.0, -2.0, -4.0, 0.0]))
