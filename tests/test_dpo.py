"""DPO: the loss against hand-worked values, the pair layouts' log-probs, and a tiny model
that learns, with the invariants every stage keeps (accumulation, resume, ranks, LoRA)."""

import json
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


def test_rpo_nll_term_by_hand():
    # chosen lengths (2, 4): per-token NLL of chosen 1 / 2 = 0.5 and 3 / 4 = 0.75, mean 0.625
    lengths = t([2.0, 4.0])
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.1, nll_weight=2.0, chosen_lengths=lengths)
    # DPO 0.6943967 (test_dpo_sigmoid_by_hand) + 2 * 0.625 = 1.9443967
    assert loss.item() == pytest.approx(1.9443967, abs=1e-6)
    assert stats["chosen_nll"].item() == pytest.approx(0.625, abs=1e-7)
    # the term's gradient on pc is -alpha / len / B: -2 / 2 / 2 = -0.5 and -2 / 4 / 2 = -0.25,
    # added to DPO's (-0.02375104, -0.02624896); the rejected log-probs get DPO's alone
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.1, nll_weight=2.0, chosen_lengths=lengths)[0].backward()
    assert torch.allclose(pc.grad, t([-0.52375104, -0.27624896]), atol=1e-7)
    assert torch.allclose(pr.grad, t([0.02375104, 0.02624896]), atol=1e-7)
    # already averaged log-probs (no lengths): NLL (1 + 3) / 2 = 2; with IPO (2.0, test_ipo_by_hand)
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo", nll_weight=0.5)
    assert loss.item() == pytest.approx(2.0 + 0.5 * 2.0, abs=1e-6) and stats["chosen_nll"].item() == 2.0
    # weight 0 is plain DPO, whatever the lengths
    assert dpo_loss(PC, PR, RC, RR, 0.1, nll_weight=0.0, chosen_lengths=lengths)[0] == dpo_loss(PC, PR, RC, RR, 0.1)[0]


def test_dpo_loss_matches_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    x = [-10 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4)]
    lengths = torch.randint(1, 20, (16,), generator=g).double()
    for loss_type, beta, ls, alpha in [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.3, 0.1, 0.0), ("ipo", 0.2, 0.0, 0.0),
                                       ("sigmoid", 0.5, 0.0, 1.0)]:
        loss, stats = dpo_loss(*x, beta=beta, loss_type=loss_type, label_smoothing=ls, nll_weight=alpha,
                               chosen_lengths=lengths)
        total, right = 0.0, 0
        for pc, pr, rc, rr, n in zip(*(v.tolist() for v in (*x, lengths))):
            h = (pc - rc) - (pr - rr)
            if loss_type == "sigmoid":
                total += -(1 - ls) * math.log(1 / (1 + math.exp(-beta * h))) \
                    - ls * math.log(1 / (1 + math.exp(beta * h)))
            else:
                total += (h - 1 / (2 * beta)) ** 2
            total += alpha * -pc / n
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


# --------------------------------------------------------------------------- pair layouts


from conftest import CHAT_TEMPLATE, TINY_ARCHS  # noqa: E402
from rlhf.config import DPOConfig, ModelConfig, load_stage_config  # noqa: E402
from rlhf.trainers.dpo import DPOTrainer, collate_dpo, pair_logprobs  # noqa: E402
from rlhf.trainers.reward import SHARED_PREFIX_MODEL_TYPES  # noqa: E402

EOS = 0  # any id: nothing here compares ids with EOS


def example(prompt, chosen, rejected):
    return {"chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected, "prompt_length": len(prompt),
            "margin": 0.0}


# Pairs that exercise every boundary: equal leading response tokens (the shared prefix runs
# past the prompt), a rejected response that is a prefix of the chosen one (empty rejected
# suffix) and the other way round, one-token prompts and responses, suffixes of unequal length.
PAIRS = [
    example([5, 6, 7], [8, 9, 10, EOS], [8, 9, 11, 12, EOS]),
    example([5, 13, 14, 15], [16, 17, EOS], [16, 17]),
    example([18], [19, 20], [19, 20, 21, 22, EOS]),
    example([23, 24], [25, EOS], [26, 27, 28, 29, 30, EOS]),
    example([31], [32], [33]),  # one-token responses: packed beside pair 2
]


def alone_logprobs(model, ids, prompt_length, average=False):
    """The slow reference: one sequence through the model, its response tokens' log-probs."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    terms = [logp[t - 1, ids[t]].item() for t in range(prompt_length, len(ids))]
    return sum(terms) / (len(terms) if average else 1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_equal_in_every_layout(family, average, tokenizer):
    from rlhf.models import load_causal_lm

    assert family in SHARED_PREFIX_MODEL_TYPES
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(arch=dict(TINY_ARCHS[family]), dropout=0.0), tokenizer).eval()
    expected = torch.tensor([[alone_logprobs(model, e[k], e["prompt_length"], average) for e in PAIRS]
                             for k in ("chosen_ids", "rejected_ids")], dtype=torch.float64)
    for layout in [dict(shared_prefix=False), dict(shared_prefix=True), dict(shared_prefix=True, pack=True)]:
        batch = collate_dpo(PAIRS, tokenizer.pad_token_id, **layout)
        if layout.get("pack"):
            assert batch["input_ids"].shape[0] < len(PAIRS)  # pairs side by side in rows
        with torch.no_grad():
            chosen, rejected = pair_logprobs(model, batch, "cpu", average)
        got = torch.stack([chosen, rejected]).double()
        assert torch.allclose(got, expected, atol=1e-5), (family, layout, got, expected)
        assert batch["target_ids"].numel() == sum(len(e[k]) - e["prompt_length"] for e in PAIRS
                                                  for k in ("chosen_ids", "rejected_ids"))


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_pair_logprobs_through_head_chunks_equal_full_logits(shared_prefix, tokenizer):
    """Values and gradients: the response positions through the LM head a few at a time
    (rlhf.lm_head.picked_logprobs) against the full logits (logits_chunk_mib=0)."""
    from rlhf.lm_head import chunk_tokens
    from rlhf.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(arch=dict(TINY_ARCHS["llama"]), dropout=0.0), tokenizer)
    batch = collate_dpo(PAIRS, tokenizer.pad_token_id, shared_prefix=shared_prefix)
    chunk_mib = 0.0005
    assert 0 < chunk_tokens(model.config.vocab_size, chunk_mib) < batch["target_ids"].numel() / 3  # several chunks
    runs = []
    for mib in (0, chunk_mib):
        model.zero_grad()
        chosen, rejected = pair_logprobs(model, batch, "cpu", chunk_mib=mib)
        (chosen - 0.5 * rejected).sum().backward()
        runs.append((chosen.detach(), rejected.detach(),
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (c0, r0, g0), (c1, r1, g1) = runs
    assert torch.allclose(c1, c0, atol=1e-5) and torch.allclose(r1, r0, atol=1e-5)
    assert g1.keys() == g0.keys() and all(torch.allclose(g1[n], g0[n], atol=1e-5) for n in g0)


def test_prompt_length_marks_the_response_in_every_pair_format(tmp_path, tokenizer):
    from rlhf.config import DataConfig
    from rlhf.data.formats import tokenize_pairs
    from rlhf.data.sources import read_source
    from rlhf.config import SourceConfig

    rows = [{"prompt": "Describe the apple.\n", "chosen": "lovely.", "rejected": "awful."},
            {"chosen": "\n\nHuman: Describe the apple.\n\nAssistant: lovely.",
             "rejected": "\n\nHuman: Describe the apple.\n\nAssistant: awful."},
            {"chosen": [{"role": "user", "content": "Describe the apple."}, {"role": "assistant", "content": "lovely."}],
             "rejected": [{"role": "user", "content": "Describe the apple."},
                          {"role": "assistant", "content": "awful."}]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = tokenize_pairs(read_source(SourceConfig(path=str(path))), tokenizer, DataConfig(max_length=64))
    for e in examples:
        p = e["prompt_length"]
        assert e["chosen_ids"][:p] == e["rejected_ids"][:p]
        assert tokenizer.decode(e["chosen_ids"][p:], skip_special_tokens=True).strip() == "lovely."
        assert tokenizer.decode(e["rejected_ids"][p:], skip_special_tokens=True).strip() == "awful."


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    """A tiny random causal LM saved in HF format: the policy (and reference) starts from it."""
    from rlhf.models import load_causal_lm

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("policy")
    model = load_causal_lm(ModelConfig(arch=dict(TINY_ARCHS["llama"]), dropout=0.0), tokenizer)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, task_dir):
    """The task's first 512 training pairs and 48 held-out pairs (evaluation stays cheap)."""
    d = tmp_path_factory.mktemp("pairs")
    for name, n in (("train", 512), ("eval", 48)):
        lines = (task_dir / f"pairs_{name}.jsonl").read_text().splitlines(keepends=True)[:n]
        (d / f"{name}.jsonl").write_text("".join(lines))
    return d


def dpo_cfg(out, policy_dir, pairs, *overrides):
    return load_stage_config(DPOConfig, None, [
        f"output_dir={out}", f"model.path={policy_dir}", f"data.path={pairs / 'train.jsonl'}",
        f"data.eval.path={pairs / 'eval.jsonl'}", "data.max_samples=128", "data.max_length=48",
        "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=4", "optim.lr=2e-3",
        "eval_sampling.prompts=0", "logging.progress_bar=false", *overrides])


def metric(out, key):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.policy.module.state_dict().items()}


def test_dpo_learns_and_exports(tmp_path, policy_dir, pairs, task_dir, backbone):
    from transformers import AutoModelForCausalLM

    cfg = dpo_cfg(tmp_path / "out", policy_dir, pairs, "data.max_samples=384", "train.global_batch_size=32",
                  "train.micro_batch_size=32", "train.max_steps=12", "dpo.beta=0.5", "eval_sampling.prompts=16",
                  "eval_sampling.max_new_tokens=8", f"task.dir={task_dir}")
    trainer = DPOTrainer(cfg, backbone)
    trainer.setup()
    before = weights(trainer)
    trainer.resume()
    trainer.train()
    final = trainer.finish()
    after = weights(trainer)
    out = tmp_path / "out"
    # at the start the policy is its own reference: every implicit reward is 0 (to fp32 rounding: the
    # reference pass batches pairs by length, so its padding and summation order differ)
    assert metric(out, "eval/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert metric(out, "eval/margin")[0] == pytest.approx(0.0, abs=1e-5)
    # it learned which response of a held-out pair is better, and every weight moved
    assert final["eval/reward_accuracy"] >= 0.8 and final["eval/loss"] < 0.6, final  # from log 2 = 0.693
    assert final["eval/margin"] > 0 and final["eval/chosen_reward"] > final["eval/rejected_reward"]
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    # sampled responses to held-out prompts were judged by the task's gold reward
    assert len(metric(out, "eval/gold_reward")) == 2 and 0 <= final["eval/eos_rate"] <= 1
    assert (out / "ref_logprobs.pt").exists() and (out / "dpo_curves.png").exists()
    # the export is a plain causal LM with the engine's logits
    hf = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.policy.eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, trainer.policy(input_ids=x).logits, atol=1e-5)


def test_gradient_accumulation_equals_bigger_batch(tmp_path, policy_dir, pairs, backbone):
    runs = {}
    for name, micro in (("a", 8), ("b", 2)):
        cfg = dpo_cfg(tmp_path / name, policy_dir, pairs, "train.global_batch_size=8",
                      f"train.micro_batch_size={micro}")
        trainer = DPOTrainer(cfg, backbone)
        trainer.fit()
        runs[name] = (trainer.accumulation, metric(tmp_path / name, "train/loss"), weights(trainer))
    (acc_a, la, wa), (acc_b, lb, wb) = runs["a"], runs["b"]
    assert acc_a == 1 and acc_b == 4 and len(la) == 4
    assert la == pytest.approx(lb, abs=1e-5) and la[-1] < la[0]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, policy_dir, pairs, backbone, monkeypatch, capsys):
    full = DPOTrainer(dpo_cfg(tmp_path / "full", policy_dir, pairs, "checkpoint.every=2"), backbone)
    full.fit()
    cfg = dpo_cfg(tmp_path / "cut", policy_dir, pairs, "checkpoint.every=2")
    real = DPOTrainer.train_step

    def crash(self, micro_batches):
        if self.step == 3:
            raise KeyboardInterrupt("simulated crash after step 3")
        return real(self, micro_batches)

    monkeypatch.setattr(DPOTrainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        DPOTrainer(cfg, backbone).fit()
    monkeypatch.setattr(DPOTrainer, "train_step", real)
    capsys.readouterr()
    resumed = DPOTrainer(cfg, backbone)
    resumed.fit()
    assert "reference log-probs read from" in capsys.readouterr().out  # not recomputed
    assert metric(tmp_path / "cut", "train/loss") == pytest.approx(metric(tmp_path / "full", "train/loss"), abs=1e-6)
    wf, wr = weights(full), weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_live_reference_equals_the_precomputed_one(tmp_path, policy_dir, pairs, backbone):
    """A frozen reference engine beside the policy gives the run of the precomputed
    log-probs; so does a reference named by path (here the policy's own start)."""
    runs = {}
    for name, flags in {"precompute": [], "live": ["dpo.reference=live"],
                        "named": ["dpo.reference=live", f"ref_model.path={policy_dir}"]}.items():
        trainer = DPOTrainer(dpo_cfg(tmp_path / name, policy_dir, pairs, *flags), backbone)
        trainer.fit()
        assert (trainer.ref_policy is None) == (name == "precompute")
        assert (tmp_path / name / "ref_logprobs.pt").exists() == (name == "precompute")
        runs[name] = metric(tmp_path / name, "train/loss") + metric(tmp_path / name, "eval/margin")
    assert runs["live"] == pytest.approx(runs["precompute"], abs=1e-5)
    assert runs["named"] == pytest.approx(runs["precompute"], abs=1e-5)


@pytest.mark.parametrize("flags", [["dpo.loss_type=ipo", "dpo.length_normalized=true"],
                                   ["dpo.label_smoothing=0.1", "dpo.shared_prefix=false"],
                                   ["data.packing=true", "dpo.beta=0.5", "dpo.nll_weight=1.0"]],
                         ids=["ipo-averaged", "cdpo-separate-rows", "packed-rpo"])
def test_variants_train(flags, tmp_path, policy_dir, pairs, backbone):
    final = DPOTrainer(dpo_cfg(tmp_path / "out", policy_dir, pairs, "train.max_steps=6", *flags), backbone).fit()
    losses = metric(tmp_path / "out", "train/loss")
    assert losses[-1] < losses[0] and final["eval/reward_accuracy"] > 0.5, (losses, final)


def test_lora_trains_adapters_only_and_exports_merged(tmp_path, policy_dir, pairs, backbone):
    from transformers import AutoModelForCausalLM

    trainer = DPOTrainer(dpo_cfg(tmp_path / "out", policy_dir, pairs, "model.lora.r=4"), backbone)
    trainer.setup()
    before = weights(trainer)
    trainer.resume()
    trainer.train()
    trainer.finish()
    after = weights(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    # the reference was the base model: the first step's loss is log 2 exactly
    assert metric(tmp_path / "out", "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").eval()
    assert not any("lora" in k for k in hf.state_dict())
    x = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.policy.eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, trainer.policy(input_ids=x).logits, atol=1e-5)


def test_zero_stages_and_two_ranks_agree(tmp_path, policy_dir, pairs, backbone):
    from test_distributed import run_two_ranks

    stages = ["0", "3"]
    common = [f"model.path={policy_dir}", f"data.path={pairs / 'train.jsonl'}", f"data.eval.path={pairs / 'eval.jsonl'}", "data.max_samples=64", "data.max_length=48",
              "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=3", "optim.lr=2e-3",
              "eval_sampling.prompts=5", "eval_sampling.max_new_tokens=4", "logging.progress_bar=false"]
    run_two_ranks("dpo", tmp_path / "two", stages, common)
    reference = None
    for z in stages:
        cfg = load_stage_config(DPOConfig, None, [f"output_dir={tmp_path}/one/zero{z}", f"deepspeed.zero_stage={z}",
                                                  *common])
        DPOTrainer(cfg, backbone).fit()
        one = metric(tmp_path / "one" / f"zero{z}", "train/loss") + metric(tmp_path / "one" / f"zero{z}", "eval/loss")
        two = metric(tmp_path / "two" / f"zero{z}", "train/loss") + metric(tmp_path / "two" / f"zero{z}", "eval/loss")
        assert len(one) == 5 and one == pytest.approx(two, abs=1e-5), (z, one, two)
        reference = reference or one
        assert one == pytest.approx(reference, abs=1e-5)  # ZeRO-3 is the same run as ZeRO-0


@pytest.mark.parametrize("flags,message", [
    (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing: applies to loss_type sigmoid only"),
    (["dpo.beta=0"], "dpo.beta: must be > 0"),
    (["dpo.nll_weight=-1"], "dpo.nll_weight: must be >= 0"),
    (["data.packing=true", "dpo.shared_prefix=false"], "data.packing: packing pairs side by side"),
    (["model.path=null", f"model.arch={json.dumps(TINY_ARCHS['llama'])}", "dpo.reference=live"],
     "dpo.reference: live scoring by the policy's start"),
    (["ref_model.path=x", "ref_model.lora.r=4"], "ref_model.lora.r: the frozen reference takes no LoRA"),
])
def test_bad_settings_are_refused(flags, message, tmp_path, policy_dir, pairs):
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        dpo_cfg(tmp_path / "out", policy_dir, pairs, *flags)
