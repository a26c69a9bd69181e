"""PPO mechanics on tiny random models: token boundaries, the first ratio, exports, ZeRO-3
rollouts, exact resume, the four models on two ranks, EMA and ptx, and a subclass."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_ARCHS
from rlhf.config import ModelConfig, PPOConfig, RolloutConfig, DeepSpeedConfig, load_stage_config
from rlhf.losses import last_action_index
from rlhf.models import load_causal_lm, load_scalar_model
from rlhf.rollout import (action_mask_from_response, full_sequence, generate, response_logprobs,
                          sample_from_scores, sample_responses)
from rlhf.trainers.ppo import PPOTrainer
from test_distributed import run_two_ranks


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """A tiny random policy and a reward model built from it, saved in HF format."""
    d = tmp_path_factory.mktemp("ppo_models")
    torch.manual_seed(0)
    policy = load_causal_lm(ModelConfig(arch=dict(TINY_ARCHS["llama"]), dropout=0.0), tokenizer)
    policy.save_pretrained(d / "policy")
    tokenizer.save_pretrained(d / "policy")
    rm = load_scalar_model(ModelConfig(path=str(d / "policy")), tokenizer)
    rm.save_pretrained(d / "rm")
    tokenizer.save_pretrained(d / "rm")
    return d


def ppo_overrides(out, models, task_dir, *extra):
    return [f"output_dir={out}", f"policy.model.path={models / 'policy'}", f"value.model.path={models / 'rm'}",
            f"reward.model.path={models / 'rm'}", f"data.path={task_dir / 'prompts_train.jsonl'}",
            f"data.eval.path={task_dir / 'prompts_eval.jsonl'}", "data.max_samples=64", "rollout.batch_size=16",
            "rollout.max_new_tokens=12", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.max_steps=3", "ppo.epochs=2", "policy.optim.lr=1e-3", "value.optim.lr=1e-3",
            "logging.progress_bar=false", "sample_every=1", *extra]


def ppo_cfg(out, models, task_dir, *extra):
    return load_stage_config(PPOConfig, None, ppo_overrides(out, models, task_dir, *extra))


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_action_mask_from_positions():
    eos = 2
    resp = torch.tensor([[5, 6, eos, 1, 1], [5, eos, 7, eos, 1], [5, 6, 7, 8, 9], [eos, 1, 1, 1, 1]])
    # up to and including the first EOS; a row without EOS is all action
    assert action_mask_from_response(resp, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
                                                             [1, 0, 0, 0, 0]]


def test_sample_from_scores_draws_the_softmax():
    scores = torch.tensor([[2.0, 0.0, float("-inf"), -1.0, 1.0], [0.0, 0.0, 0.0, float("-inf"), float("-inf")]])
    n = 40000
    g = torch.Generator().manual_seed(0)
    draws = sample_from_scores(scores.repeat_interleave(n, 0), g).view(2, n)
    for row, d in zip(scores, draws):
        p = torch.softmax(row, -1)
        freq = torch.bincount(d, minlength=5).double() / n
        assert (freq[p == 0] == 0).all()  # -inf is never drawn
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4).all(), (freq, p)


def prompt_batch(tokenizer, nouns=("apple", "stone", "garden", "city", "river", "song")):
    from rlhf.data.batching import collate_prompts

    rows = [{"prompt_ids": tokenizer(f"Describe the {n}{' and the road' * (i % 3)}.\n")["input_ids"]}
            for i, n in enumerate(nouns)]
    return collate_prompts(rows, tokenizer.pad_token_id)


def test_generated_tokens_follow_the_settings(models, tokenizer):
    """The first sampled token is distributed as softmax(logits / T) with pad removed and
    top-k applied; min_new_tokens holds EOS back; greedy is the argmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models / "policy").eval()
    b = prompt_batch(tokenizer, ("apple",))
    n = 20000
    ids, mask = b["input_ids"].repeat(n, 1), b["attention_mask"].repeat(n, 1)
    torch.manual_seed(0)
    settings = RolloutConfig(max_new_tokens=1, temperature=0.5, top_k=4)
    first, _ = sample_responses(model, ids, mask, settings, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0, -1] / 0.5
    logits[tokenizer.pad_token_id] = float("-inf")
    top = logits.topk(4).indices
    p = torch.zeros_like(logits)
    p[top] = torch.softmax(logits[top], -1)
    freq = torch.bincount(first[:, 0], minlength=len(p)).double() / n
    assert set(first[:, 0].unique().tolist()) <= set(top.tolist())
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4).all()

    b = prompt_batch(tokenizer)
    greedy, _ = sample_responses(model, b["input_ids"], b["attention_mask"], RolloutConfig(max_new_tokens=3),
                                 tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    with torch.no_grad():
        ref = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False,
                             max_new_tokens=3, pad_token_id=tokenizer.pad_token_id,
                             suppress_tokens=[tokenizer.pad_token_id])
    assert torch.equal(greedy, ref[:, b["input_ids"].shape[1]:])

    # EOS made likely, then held back for the first 4 tokens
    class EosFirst(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, hidden):
            logits = self.head(hidden)
            logits[..., tokenizer.eos_token_id] += 100.0
            return logits

    model.lm_head = EosFirst(model.lm_head)
    out, _ = sample_responses(model, b["input_ids"], b["attention_mask"],
                              RolloutConfig(max_new_tokens=8, min_new_tokens=4), tokenizer.eos_token_id,
                              tokenizer.pad_token_id)
    assert (out[:, :4] != tokenizer.eos_token_id).all() and (out[:, 4] == tokenizer.eos_token_id).all()


@pytest.mark.parametrize("settings, lora", [(dict(), False), (dict(), True),
                                            (dict(temperature=0.7, top_k=20, top_p=0.9, min_new_tokens=3), False)])
def test_logprobs_from_generation_equal_a_forward_pass(models, tokenizer, backbone, settings, lora):
    from rlhf.config import LoraConfig, OptimConfig
    from rlhf.models import apply_lora

    model = load_causal_lm(ModelConfig(path=str(models / "policy")), tokenizer)
    if lora:  # PEFT's generate, with adapters that change the outputs
        model = apply_lora(model, LoraConfig(r=4), "CAUSAL_LM")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    engine = backbone.wrap(model, DeepSpeedConfig(zero_stage=0), OptimConfig(lr=1e-4))
    b = prompt_batch(tokenizer)
    cfg = RolloutConfig(max_new_tokens=12, micro_batch_size=4, **settings)  # two generate calls
    torch.manual_seed(0)
    response, action_mask, logprobs = generate(engine, b["input_ids"], b["attention_mask"], cfg, tokenizer, 0,
                                               with_logprobs=True)
    ids, mask = full_sequence(b["input_ids"], b["attention_mask"], response, action_mask)
    with torch.no_grad():
        forward = response_logprobs(engine.module, ids, mask, b["input_ids"].shape[1], cfg.temperature)
    assert (logprobs[action_mask == 0] == 0).all()
    assert torch.allclose(logprobs, forward * action_mask, atol=1e-5)


def test_model_generation_config_does_not_change_rollouts(models, tokenizer, tmp_path):
    """A hub model's generation_config.json (repetition penalty, banned words, ...) must not
    change what PPO samples; the model keeps it for export."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    plain = AutoModelForCausalLM.from_pretrained(models / "policy").eval()
    b = prompt_batch(tokenizer)
    before, _ = sample_responses(plain, b["input_ids"], b["attention_mask"], RolloutConfig(max_new_tokens=8),
                                 tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    hub = GenerationConfig(repetition_penalty=50.0, no_repeat_ngram_size=1, bad_words_ids=[[int(before[0, 0])]],
                           top_k=3, temperature=0.2, do_sample=True)
    plain.generation_config = hub
    after, _ = sample_responses(plain, b["input_ids"], b["attention_mask"], RolloutConfig(max_new_tokens=8),
                                tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    assert torch.equal(before, after)
    assert plain.generation_config is hub


def test_ppo_with_logprobs_from_generation(tmp_path, models, task_dir, backbone):
    cfg = ppo_cfg(tmp_path / "out", models, task_dir, "train.max_steps=2", "rollout.logprobs_from_generation=true",
                  "rollout.micro_batch_size=8", "rollout.min_new_tokens=2", "sample_every=0")
    PPOTrainer(cfg, backbone).fit()
    rows = [r for r in metrics(tmp_path / "out") if "ppo/score" in r]
    assert len(rows) == 2 and all(abs(r["ppo/ratio_at_start"] - 1) < 1e-5 for r in rows)


class Recording(PPOTrainer):
    """Keeps the experience of every step so tests can look inside."""

    def compute_advantages(self, exp):
        advantages, returns = super().compute_advantages(exp)
        self.seen = getattr(self, "seen", []) + [(exp, advantages)]
        return advantages, returns


def test_ppo_step_boundaries_ratio_and_export(tmp_path, models, task_dir, tokenizer, backbone):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trainer = Recording(ppo_cfg(tmp_path / "out", models, task_dir, "ppo.missing_eos_penalty=1.0"), backbone)
    trainer.fit()
    rows = metrics(tmp_path / "out")
    step_rows = [r for r in rows if "ppo/score" in r]
    assert len(step_rows) == 3
    for key in ("ppo/score", "ppo/score_std", "ppo/kl", "ppo/kl_coef", "ppo/reward", "ppo/returns",
                "ppo/advantages", "ppo/value_error", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy",
                "ppo/response_length", "ppo/eos_rate", "ppo/ratio_at_start", "time/generate_s", "time/train_s",
                "ppo/episodes_per_s"):
        assert key in step_rows[0], key
    # nothing was updated before the first minibatch: new / old = 1
    assert all(abs(r["ppo/ratio_at_start"] - 1) < 1e-5 for r in step_rows)
    for exp, advantages in trainer.seen:
        mask = exp.action_mask.bool()
        # advantages exactly on the action mask; padding after EOS is pad, never EOS
        assert ((advantages != 0) == mask).all()
        assert (exp.response_ids[~mask] == tokenizer.pad_token_id).all()
        # the score (with the KL part at 0 where logprobs == ref at step 0) sits on the last action token
        last = last_action_index(exp.action_mask)
        assert (exp.rewards[~mask] == 0).all()
        has_eos = (exp.response_ids == tokenizer.eos_token_id).any(1)
        ends_with_eos = exp.response_ids.gather(1, last[:, None]).squeeze(1) == tokenizer.eos_token_id
        assert (has_eos == ends_with_eos).all()
    exp0 = trainer.seen[0][0]
    penalty = 1.0 * (~(exp0.response_ids == tokenizer.eos_token_id).any(1)).float()
    at_last = exp0.rewards.gather(1, last_action_index(exp0.action_mask)[:, None]).squeeze(1)
    kl_last = (-0.05 * (exp0.logprobs - exp0.ref_logprobs)).gather(1, last_action_index(exp0.action_mask)[:, None])
    assert torch.allclose(at_last, exp0.scores - penalty + kl_last.squeeze(1), atol=1e-5)
    # exports: the policy as a causal LM, the value model as a scalar-head model
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final") is not None
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "final" / "value")
    assert value.config.num_labels == 1
    samples = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert samples and {"prompt", "response", "score"} <= set(json.loads(samples[0]))


def test_zero3_rollout_equals_zero0_greedy(models, tokenizer, backbone):
    from rlhf.data.batching import collate_prompts

    prompts = [{"prompt_ids": tokenizer(f"Describe the {n} and the river.\n")["input_ids"]}
               for n in ("apple", "stone", "garden", "city")]
    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    out = {}
    for z in (0, 3):
        ds = DeepSpeedConfig(zero_stage=z)
        with backbone.model_init(ds):
            model = load_causal_lm(ModelConfig(path=str(models / "policy")), tokenizer)
        from rlhf.config import OptimConfig

        engine = backbone.wrap(model, ds, OptimConfig(lr=1e-4))
        out[z] = generate(engine, batch["input_ids"], batch["attention_mask"], RolloutConfig(max_new_tokens=10),
                          tokenizer, z, greedy=True)
    assert torch.equal(out[0][0], out[3][0]) and torch.equal(out[0][1], out[3][1])


def test_ppo_resume_reproduces(tmp_path, models, task_dir, backbone, monkeypatch):
    extra = ["train.max_steps=4", "checkpoint.every=2", "ppo.kl_controller=adaptive", "ppo.kl_target=0.1",
             "ppo.ema_decay=0.9"]
    PPOTrainer(ppo_cfg(tmp_path / "full", models, task_dir, *extra), backbone).fit()
    cfg = ppo_cfg(tmp_path / "cut", models, task_dir, *extra)
    real = PPOTrainer.make_experience

    def crash(self, prompts):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, prompts)

    monkeypatch.setattr(PPOTrainer, "make_experience", crash)
    with pytest.raises(KeyboardInterrupt):
        PPOTrainer(cfg, backbone).fit()
    monkeypatch.setattr(PPOTrainer, "make_experience", real)
    PPOTrainer(cfg, backbone).fit()
    keys = ("ppo/score", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss", "ppo/value_loss")
    full = [[r[k] for k in keys] for r in metrics(tmp_path / "full") if "ppo/score" in r]
    cut = [[r[k] for k in keys] for r in metrics(tmp_path / "cut") if "ppo/score" in r]
    assert len(full) == 4 and torch.allclose(torch.tensor(full), torch.tensor(cut), atol=1e-6)
    for sub in ("", "value", "ema"):
        a = load_file(tmp_path / "full" / "final" / sub / "model.safetensors")
        b = load_file(tmp_path / "cut" / "final" / sub / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_four_models_on_two_ranks_with_zero3(tmp_path, models, task_dir):
    out = run_two_ranks("ppo", tmp_path, ["3"], ppo_overrides(tmp_path / "unused", models, task_dir,
                                                              "train.max_steps=2")[1:])
    rows = [r for r in metrics(tmp_path / "zero3") if "ppo/score" in r]
    assert len(rows) == 2 and all(abs(r["ppo/ratio_at_start"] - 1) < 1e-5 for r in rows), out[-2000:]


def test_ptx_and_ema(tmp_path, models, task_dir, backbone):
    from transformers import AutoModelForCausalLM

    cfg = ppo_cfg(tmp_path / "out", models, task_dir, "train.max_steps=2", "ppo.ema_decay=0.5", "ppo.ptx.coef=0.5",
                  f"ppo.ptx.data.path={task_dir / 'sft_train.jsonl'}", "ppo.ptx.data.max_length=48")
    trainer = PPOTrainer(cfg, backbone)
    trainer.fit()
    assert trainer._ptx_calls == 2 * 2 * 2 * 2  # steps x ppo epochs x minibatches x micro-batches
    ema = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final" / "ema")
    live = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    diff = [k for k, v in ema.state_dict().items() if not torch.equal(v, live.state_dict()[k])]
    assert diff  # the average lags the live weights


def test_subclass_overrides_one_step(tmp_path, models, task_dir, backbone):
    # The README's example: reward brevity on top of the reward model.
    class BriefPPO(PPOTrainer):
        def compute_rewards(self, exp):
            rewards = super().compute_rewards(exp)
            self.before = rewards.clone()
            length = exp.action_mask.sum(dim=1).float()
            last = exp.action_mask.sum(dim=1) - 1  # the last response token of each row
            rewards[range(len(last)), last] -= 0.01 * length
            self.after, self.length = rewards, length
            return rewards

    trainer = BriefPPO(ppo_cfg(tmp_path / "out", models, task_dir, "train.max_steps=1"), backbone)
    trainer.fit()
    # evaluation ran make_experience too, but only training calls compute_rewards
    assert torch.allclose((trainer.before - trainer.after).sum(1), 0.01 * trainer.length)
    assert (tmp_path / "out" / "final").is_dir()
