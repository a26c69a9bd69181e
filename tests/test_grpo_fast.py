"""Exact speed-ups of the group stages: the update's own forward standing in for the
old-log-prob pass (OnPolicyTrainer.old_logprobs_from_update), and each group's prompt
computed once (rollout.shared_prefix, rlhf/rollout/groups.py)."""

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import GRPOConfig, load_stage_config
from rlhf.trainers.algorithms import GRPOTrainer
from rlhf.trainers.ppo import PPOTrainer
from test_grpo import overrides, prompts_with_answers  # noqa: F401  (fixtures)
from test_ppo import metrics, models, ppo_cfg  # noqa: F401  (the tiny policy and reward model)


class WithOldLogprobPass(GRPOTrainer):
    def old_logprobs_from_update(self) -> bool:
        return False


def one_step(tmp_path, models, data, trainer_cls, backbone, *extra):  # noqa: F811
    # 8 prompts x 4 responses = 32 rows = one minibatch of 4 micro-batches: one optimizer step
    cfg = load_stage_config(GRPOConfig, None, overrides(
        tmp_path, models, data, f"reward.function={data / 'reward.py'}:score", "grpo.epochs=1",
        "train.global_batch_size=32", "train.max_steps=1", *extra))
    trainer = trainer_cls(cfg, backbone)
    trainer.fit()
    return trainer, [r for r in metrics(tmp_path) if "grpo/score" in r][0]


def test_one_step_update_gives_the_old_logprobs_exactly(tmp_path, models, prompts_with_answers, backbone):  # noqa: F811
    """The same rollout trained with and without the old-log-prob pass: same losses,
    gradient norm, KL and updated weights (fp32, one step)."""
    fast, row = one_step(tmp_path / "fast", models, prompts_with_answers, GRPOTrainer, backbone)
    slow, ref = one_step(tmp_path / "slow", models, prompts_with_answers, WithOldLogprobPass, backbone)
    assert fast.old_logprobs_from_update() and not slow.old_logprobs_from_update()
    assert "time/score_policy_s" not in row and "time/score_policy_s" in ref
    assert row["grpo/score"] == ref["grpo/score"]  # the same responses
    assert row["grpo/ratio_at_start"] == 1.0  # old = new, detached, by construction
    assert abs(ref["grpo/ratio_at_start"] - 1) < 1e-5
    for key in ("grpo/policy_loss", "grpo/kl_loss", "grpo/kl", "grpo/policy_grad_norm", "grpo/entropy"):
        assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    a = load_file(tmp_path / "fast" / "final" / "model.safetensors")
    b = load_file(tmp_path / "slow" / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the update changed the weights (the comparison is not vacuous)
    start = load_file(models / "policy" / "model.safetensors")
    assert any(not torch.allclose(start[k], a[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("extra", [("grpo.epochs=2",), ("train.global_batch_size=16",),
                                   ("grpo.kl_in=reward",)])
def test_the_old_logprob_pass_runs_when_needed(tmp_path, models, prompts_with_answers, backbone, extra):  # noqa: F811
    """Several epochs or minibatches (the weights move before later ones), or a KL in the
    reward (read before the update): the pass runs."""
    trainer, row = one_step(tmp_path, models, prompts_with_answers, GRPOTrainer, backbone, *extra)
    assert not trainer.old_logprobs_from_update() and "time/score_policy_s" in row


def test_ppo_keeps_the_old_logprob_pass(tmp_path, models, task_dir, backbone):  # noqa: F811
    """PPO's rewards read the old log-probs (its KL penalty): the pass runs, even for one
    epoch of one minibatch."""
    cfg = ppo_cfg(tmp_path, models, task_dir, "ppo.epochs=1", "train.global_batch_size=16", "train.max_steps=1",
                  "data.eval=null")
    trainer = PPOTrainer(cfg, backbone)
    trainer.fit()
    row = [r for r in metrics(tmp_path) if "ppo/score" in r][0]
    assert not trainer.old_logprobs_from_update() and "time/score_policy_s" in row
    assert not trainer.shared_prefix and trainer.group_size(4) == 1  # n = 1: separate rows


# ---------------------------------------------------------------- the shared-prefix layout of a group

def rollout_batch(vocab, pad, eos, group, prompt_lengths=(5, 2, 7), R=6):
    """Left-padded prompts of different lengths, `group` responses each, with EOS at
    different places (one response without any), pad after it."""
    g = torch.Generator().manual_seed(1)
    P = max(prompt_lengths)
    prompt_ids = torch.full((len(prompt_lengths), P), pad)
    prompt_mask = torch.zeros(len(prompt_lengths), P, dtype=torch.long)
    for i, n in enumerate(prompt_lengths):
        prompt_ids[i, P - n:] = torch.randint(3, vocab, (n,), generator=g)
        prompt_mask[i, P - n:] = 1
    B = len(prompt_lengths) * group
    response_ids = torch.randint(3, vocab, (B, R), generator=g)
    ends = [(i * 2) % (R + 1) for i in range(B)]  # R: no EOS (the response reached max_new_tokens)
    for i, e in enumerate(ends):
        if e < R:
            response_ids[i, e] = eos
            response_ids[i, e + 1:] = pad
    action_mask = (torch.arange(R)[None] <= torch.tensor(ends)[:, None]).long()
    return prompt_ids.repeat_interleave(group, 0), prompt_mask.repeat_interleave(group, 0), response_ids, action_mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("group", [1, 3])
def test_group_layout_gives_the_separate_rows_logprobs_and_values(tokenizer, attn, group):
    from rlhf.config import ModelConfig
    from rlhf.models import ScalarModel, load_causal_lm, load_scalar_model
    from rlhf.rollout import full_sequence, response_logprobs, response_values
    from rlhf.rollout.groups import group_layout, group_logprobs, group_values
    from conftest import TINY_ARCHS

    torch.manual_seed(0)
    cfg = ModelConfig(arch=dict(TINY_ARCHS["llama"]), dropout=0.0, attn_implementation=attn)
    policy = load_causal_lm(cfg, tokenizer).eval()
    value = ScalarModel(load_scalar_model(cfg, tokenizer)).eval()
    batch = rollout_batch(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, group)
    ids, mask = full_sequence(*batch)
    P, action = batch[0].shape[1], batch[3].bool()
    layout = group_layout(*batch, group)
    # packed: each group's prompt and responses without padding, the rows padded to the longest
    packed = [int(batch[1][k * group].sum() + batch[3][k * group:(k + 1) * group].sum()) for k in range(3)]
    assert layout.input_ids.shape == (3, max(packed)) and max(packed) < P + group * 6
    for chunk_mib in (0.0, 1.0):  # full logits, and the chunked LM head
        lp, ent = response_logprobs(policy, ids, mask, P, 0.7, with_entropy=True, chunk_mib=chunk_mib)
        glp, gent = group_logprobs(policy, layout, 0.7, with_entropy=True, chunk_mib=chunk_mib)
        assert torch.allclose(glp, lp, atol=1e-5) and torch.allclose(gent, ent, atol=1e-5)
        assert (glp[~action] == 0).all() and (glp[action] != 0).all()
    v, gv = response_values(value, ids, mask, P), group_values(value, layout)
    assert torch.allclose(gv[action], v[action], atol=1e-5)
    # gradients too: the update's backward goes through the same layout
    policy.train()
    lp = response_logprobs(policy, ids, mask, P, chunk_mib=1.0).sum()
    a = torch.autograd.grad(lp, list(policy.parameters()))
    b = torch.autograd.grad(group_logprobs(policy, layout, chunk_mib=1.0).sum(), list(policy.parameters()))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))


def test_group_layout_packs_away_every_padding_column():
    """The packed rows do not depend on how the batch was padded: more padding after
    the responses, prompts padded on the right instead of the left, give the same rows,
    and each response token is still predicted from the same packed column."""
    from rlhf.rollout.groups import group_layout

    group, pad = 3, 1
    prompt_ids, prompt_mask, response_ids, action_mask = rollout_batch(50, pad, 2, group)
    base = group_layout(prompt_ids, prompt_mask, response_ids, action_mask, group)
    # the same rollout with 4 more padding columns on each side of the prompts' and after the responses'
    extra = torch.full((prompt_ids.shape[0], 4), pad)
    lp = torch.stack([torch.cat([r[m.bool()], torch.full(((~m.bool()).sum() + 4,), pad)])
                      for r, m in zip(prompt_ids, prompt_mask)])
    lm = torch.stack([torch.cat([torch.ones(int(m.sum()), dtype=torch.long), torch.zeros(len(m) - int(m.sum()) + 4,
                                                                                        dtype=torch.long)])
                      for m in prompt_mask])
    padded = group_layout(lp, lm, torch.cat([response_ids, extra], 1),
                          torch.cat([action_mask, torch.zeros_like(extra)], 1), group)
    for name in ("input_ids", "allowed", "position_ids"):
        assert torch.equal(getattr(base, name), getattr(padded, name)), name
    a = action_mask.bool()
    assert torch.equal(base.predictor_cols[a], padded.predictor_cols[:, :6][a])
    assert torch.equal(base.predictor_rows[a], padded.predictor_rows[:, :6][a])
    # the first response token of every branch is predicted by its prompt's last token
    plen = prompt_mask[::group].sum(1).repeat_interleave(group)
    assert torch.equal(base.predictor_cols[:, 0], plen - 1)


def test_grpo_run_is_the_same_with_and_without_the_shared_prefix(tmp_path, models, prompts_with_answers,
                                                                  backbone):  # noqa: F811
    """Two steps of two epochs over one minibatch (the order within it changes no sum):
    the same scores, KL, losses, gradient norms and weights, both layouts. Micro-batches
    of 8 rows hold 2 groups of 4; the scoring passes run in chunks of 6 rows, so groups
    of gcd(6, 4) = 2."""
    extra = ("grpo.epochs=2", "train.max_steps=2", "train.eval_batch_size=6")
    runs = {}
    for on in ("true", "false"):
        out = tmp_path / on
        trainer, _ = one_step(out, models, prompts_with_answers, GRPOTrainer, backbone, *extra,
                              f"rollout.shared_prefix={on}")
        assert trainer.shared_prefix == (on == "true") and trainer.group_size(8) == (4 if on == "true" else 1)
        runs[on] = [r for r in metrics(out) if "grpo/score" in r], load_file(out / "final" / "model.safetensors")
    (a, wa), (b, wb) = runs["true"], runs["false"]
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["grpo/score"] == rb["grpo/score"]  # the same responses
        for key in ("grpo/kl", "grpo/policy_loss", "grpo/kl_loss", "grpo/policy_grad_norm", "grpo/entropy",
                    "grpo/ratio_at_start"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


class CountingMicroBatches(GRPOTrainer):
    def train_step(self, micro_batches):
        self.rows_per_micro_batch = [mb.action_mask.shape[0] for mb in micro_batches]
        return super().train_step(micro_batches)


@pytest.mark.parametrize("shared,zero", [("true", 0), ("false", 0), ("true", 2)])
def test_micro_batches_by_tokens_update_as_fixed_ones(tmp_path, models, prompts_with_answers, backbone,  # noqa: F811
                                                      shared, zero):
    """train.micro_batch_tokens: one optimizer step over 32 rows (4 accumulation steps of
    8 rows by the config) in one micro-batch (a large budget) or in many (a small one):
    the same losses, gradient norm and weights as the 4 fixed micro-batches."""
    runs = {}
    for name, extra in (("fixed", ()), ("one", ("train.micro_batch_tokens=100000",)),
                        ("many", ("train.micro_batch_tokens=60",))):
        out = tmp_path / name
        trainer, row = one_step(out, models, prompts_with_answers, CountingMicroBatches, backbone,
                                f"rollout.shared_prefix={shared}", f"deepspeed.zero_stage={zero}", *extra)
        runs[name] = trainer.rows_per_micro_batch, row, load_file(out / "final" / "model.safetensors")
    assert runs["fixed"][0] == [8, 8, 8, 8] and runs["one"][0] == [32]
    many = runs["many"][0]
    assert len(many) > 4 and sum(many) == 32 and all(n % (4 if shared == "true" else 1) == 0 for n in many)
    _, a, wa = runs["fixed"]
    for name in ("one", "many"):
        _, b, wb = runs[name]
        assert a["grpo/score"] == b["grpo/score"]
        for key in ("grpo/kl", "grpo/policy_loss", "grpo/kl_loss", "grpo/policy_grad_norm", "grpo/ratio_at_start"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, key)
        assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa), name


def test_budget_chunks():
    from rlhf.data.batching import budget_chunks

    # rectangles: 4 units of width 10 fit 40 tokens; a wide unit stretches its chunk
    assert budget_chunks([10] * 8, 40) == [4, 4]
    assert budget_chunks([5, 50, 5, 5], 40) == [1, 1, 2]  # 50 alone (over the budget), then 2 x 5
    assert budget_chunks([5, 5, 20, 5], 40) == [2, 2]  # 3 x 20 = 60 > 40
    # exactly `count` chunks, as even as they go
    assert budget_chunks([10] * 8, 40, 3) == [3, 3, 2]
    assert budget_chunks([10] * 8, 40, 8) == [1] * 8
    assert budget_chunks([1, 1, 1, 1, 9], 10, 3) == [2, 2, 1]
    assert budget_chunks([], 10) == []
    with pytest.raises(ValueError, match="need between 2 and 8"):
        budget_chunks([10] * 8, 40, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # against the definition: consecutive, within budget unless alone, no fewer possible
        widths = torch.randint(1, 30, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        budget = int(torch.randint(10, 120, (1,), generator=g))
        sizes = budget_chunks(widths, budget)
        assert sum(sizes) == len(widths) and min(sizes) >= 1
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        assert all(n == 1 or n * max(widths[a:a + n]) <= budget for a, n in zip(starts, sizes))
        # greedy is optimal: no split into fewer chunks fits (brute force over cut points)
        import itertools as it
        for k in range(1, len(sizes)):
            for cuts in it.combinations(range(1, len(widths)), k - 1):
                bounds = list(zip((0, *cuts), (*cuts, len(widths))))
                assert not all(b - a == 1 or (b - a) * max(widths[a:b]) <= budget for a, b in bounds)
        for count in range(len(sizes), len(widths) + 1):
            exact = budget_chunks(widths, budget, count)
            starts = [sum(exact[:i]) for i in range(len(exact))]
            assert len(exact) == count and sum(exact) == len(widths)
            assert all(n == 1 or n * max(widths[a:a + n]) <= budget for a, n in zip(starts, exact))


def test_shared_prefix_needs_a_custom_mask(tmp_path, models, prompts_with_answers):  # noqa: F811
    from rlhf.config import ConfigError

    reward = f"reward.function={prompts_with_answers / 'reward.py'}:score"
    flash = "policy.model.attn_implementation=flash_attention_2"
    args = overrides(tmp_path, models, prompts_with_answers, reward, flash)
    with pytest.raises(ConfigError, match="rollout.shared_prefix needs a custom attention mask"):
        load_stage_config(GRPOConfig, None, args + ["rollout.shared_prefix=true"])
    load_stage_config(GRPOConfig, None, args)


def test_ppo_with_groups_scores_values_in_the_shared_layout(tmp_path, models, task_dir, backbone):  # noqa: F811
    """PPO with rollout.n = 2: its value model's passes read the group layout too; one
    step (one minibatch) gives the same losses and weights as separate rows."""
    rows, weights = {}, {}
    # "tokens": the shared layout in micro-batches by tokens (one here), both engines stepping once
    for on, extra in (("true", ()), ("false", ()), ("tokens", ("train.micro_batch_tokens=100000",))):
        cfg = ppo_cfg(tmp_path / on, models, task_dir, "rollout.n=2", "ppo.epochs=1", "train.global_batch_size=32",
                      "train.max_steps=1", f"rollout.shared_prefix={on != 'false'}", "data.eval=null", *extra)
        trainer = PPOTrainer(cfg, backbone)
        trainer.fit()
        assert trainer.group_size(4) == (1 if on == "false" else 2)
        rows[on] = [r for r in metrics(tmp_path / on) if "ppo/score" in r][0]
        weights[on] = load_file(tmp_path / on / "final" / "value" / "model.safetensors")
    for other in ("false", "tokens"):
        a, b = rows["true"], rows[other]
        # (by tokens the reward model scores its rows in other chunks: the same up to rounding)
        assert a["ppo/score"] == pytest.approx(b["ppo/score"], rel=1e-6)
        for key in ("ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/value_error", "ppo/policy_grad_norm",
                    "ppo/value_grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (other, key)
        assert all(torch.allclose(weights["true"][k], weights[other][k], atol=1e-5) for k in weights["true"])


def reference_sampling(model, prompt_ids, prompt_mask, cfg, stop_ids, pad_id, greedy):
    """HF `generate` running our sampler (`SamplingSteps`) on every row of the batch at
    every step, stopped rows included (HF pads them): how rollouts were sampled before
    rows left the batch. The tokens `(B, R)` and log-probs `(B, R)`."""
    from transformers import GenerationConfig, LogitsProcessorList
    from rlhf.rollout.hf import SamplingSteps

    steps = SamplingSteps(cfg, stop_ids, pad_id, greedy, with_logprobs=True)
    P, chosen = prompt_ids.shape[1], []

    def pick(input_ids, scores):
        B = scores.shape[0]
        token, logprob = steps(scores, input_ids.shape[1] - P, torch.arange(B), B)
        chosen.append(logprob)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)

    gen = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids,
                           pad_token_id=pad_id)
    seq = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen,
                         logits_processor=LogitsProcessorList([pick]))
    return seq[:, P:], torch.stack(chosen, 1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "mistral", "qwen2"])
def test_decoding_drops_stopped_rows_and_samples_what_hf_generate_samples(tokenizer, family, monkeypatch):
    """`sample_responses`' own decoding loop, whose stopped rows leave the batch, gives
    the tokens and log-probs of HF `generate` running the same sampler on every row,
    under one seed: greedy and sampled (temperature, top-k, top-p, min_new_tokens),
    rows stopping at different steps, prompts of different lengths, each prompt alone
    or prefilled once per group; and the same again when the cache keeps every row.
    Every forward runs with cuDNN's attention kernel off (attention_without_plans),
    and it is back on afterwards."""
    from rlhf.config import ModelConfig, RolloutConfig
    from rlhf.models import load_causal_lm
    from rlhf.rollout import hf
    from conftest import PACKING_ARCHS, TINY_ARCHS

    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(arch=dict({**TINY_ARCHS, **PACKING_ARCHS}[family]), dropout=0.0),
                           tokenizer).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 6.0  # where a hidden feature is high: rows stop at different steps (greedy too), some never
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: out + bias * (args[0][..., :1] > 0.5))
    G = 3
    prompt_ids, prompt_mask, _, _ = rollout_batch(len(tokenizer), pad, eos, G, prompt_lengths=(5, 1, 7, 3))
    B, drop_rows = prompt_ids.shape[0], hf.drop_rows
    rows, cudnn = [], []  # the rows each forward reads; whether cuDNN's attention was allowed

    def record(module, args, out):
        rows.append(args[0].shape[0])
        cudnn.append(torch.backends.cuda.cudnn_sdp_enabled())

    model.get_input_embeddings().register_forward_hook(record)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    settings = [(True, RolloutConfig(max_new_tokens=10)),
                (False, RolloutConfig(max_new_tokens=10, temperature=0.8)),
                (False, RolloutConfig(max_new_tokens=10, temperature=1.3, top_k=20, top_p=0.9, min_new_tokens=2))]
    for greedy, cfg in settings:
        torch.manual_seed(5)
        with torch.no_grad():
            ref_ids, ref_lp = reference_sampling(model, prompt_ids, prompt_mask, cfg, [eos], pad, greedy)
        ref_ids, ref_mask = hf.end_at_eos(ref_ids, [eos], pad)
        lengths = ref_mask.sum(1)
        assert lengths.min() < lengths.max()  # rows stopped at different steps
        for group, can_drop in ((1, True), (G, True), (G, False)):
            monkeypatch.setattr(hf, "drop_rows", drop_rows if can_drop else (lambda cache: False))
            torch.manual_seed(5)
            rows.clear()
            cudnn.clear()
            ids, lp = hf.sample_responses(model, prompt_ids, prompt_mask, cfg, [eos], pad, greedy, with_logprobs=True,
                                          group=group)
            assert cudnn and not any(cudnn) and torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.equal(ids, ref_ids), (greedy, group, can_drop)
            assert torch.allclose(lp, ref_lp * ref_mask, atol=1e-5)
            assert (lp[ref_mask == 0] == 0).all()
            decoding = rows[1:] if group == 1 else rows[2:]  # after the prefill (and the prompts' last column)
            assert len(decoding) == ids.shape[1] - 1
            if can_drop:  # each step reads the rows that have not stopped yet
                going = [int((lengths > t).sum()) for t in range(1, ids.shape[1])]
                assert decoding == going and min(going) < B
            else:
                assert set(decoding) == {B}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "mistral", "qwen2"])
def test_generation_prefills_each_prompt_once_per_group(tokenizer, family):
    """`sample_responses` with group = G computes the prompts' cache on one row per group
    and repeats it: the same tokens (greedy and sampled under one seed) and log-probs as
    every row prefilling its own copy; prompts of different lengths, one of a single
    token (nothing to cache for it but padding)."""
    from rlhf.config import ModelConfig, RolloutConfig
    from rlhf.models import load_causal_lm
    from rlhf.rollout.hf import sample_responses
    from conftest import PACKING_ARCHS, TINY_ARCHS

    torch.manual_seed(0)
    arch = {**TINY_ARCHS, **PACKING_ARCHS}[family]
    model = load_causal_lm(ModelConfig(arch=dict(arch), dropout=0.0), tokenizer).eval()
    G = 3
    prompt_ids, prompt_mask, _, _ = rollout_batch(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, G,
                                                  prompt_lengths=(5, 1, 7, 3))
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.8)
    shapes = []  # the (rows, columns) each forward reads
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    B, P = prompt_ids.shape
    for greedy in (True, False):
        outs = []
        for group in (1, G):
            torch.manual_seed(3)
            shapes.clear()
            outs.append(sample_responses(model, prompt_ids, prompt_mask, cfg, [tokenizer.eos_token_id],
                                         tokenizer.pad_token_id, greedy, with_logprobs=True, group=group))
            # the prompts are read once per row, or once per group and then only their last
            # column (by the rows still going: a row that stopped leaves the batch)
            assert shapes[0] == ((B, P) if group == 1 else (B // G, P - 1))
            assert shapes[1][1] == 1 and shapes[1][0] <= B
        (ids, lp), (gids, glp) = outs
        assert torch.equal(ids, gids)
        assert torch.allclose(lp, glp, atol=1e-5)
        if not greedy:
            assert len({tuple(r) for r in ids[:G].tolist()}) > 1  # a group's rows sampled apart
