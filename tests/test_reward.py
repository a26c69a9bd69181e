"""Reward model on tiny models: it learns the ranking, its export scores like the engine,
every pair format trains, and it resumes exactly and agrees across ZeRO stages and ranks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import CHAT_TEMPLATE, TINY_ARCHS
from rlhf.config import RMConfig, load_stage_config
from rlhf.data.batching import collate_pairs
from rlhf.trainers.reward import RewardTrainer
from test_distributed import run_two_ranks


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    """A tiny random causal LM saved in HF format: the reward model starts from it."""
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("policy")
    model = load_causal_lm(ModelConfig(arch=dict(TINY_ARCHS["llama"]), dropout=0.0), tokenizer)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def rm_cfg(out, policy_dir, task_dir, *overrides):
    return load_stage_config(RMConfig, None, [
        f"output_dir={out}", f"model.path={policy_dir}", f"data.path={task_dir / 'pairs_train.jsonl'}",
        f"data.eval.path={task_dir / 'pairs_eval.jsonl'}", "data.max_samples=128", "data.max_length=48",
        "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=4", "optim.lr=2e-3",
        "model.dropout=0.0", "logging.progress_bar=false", *overrides])


def metric(out, key):
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines() if key in json.loads(x)]


def test_reward_model_learns_and_exports(tmp_path, policy_dir, task_dir, backbone):
    from transformers import AutoModelForSequenceClassification

    cfg = rm_cfg(tmp_path / "out", policy_dir, task_dir, "data.max_samples=1024", "train.global_batch_size=32",
                 "train.micro_batch_size=32", "train.max_steps=40", "reward.centering_coef=0.01")
    trainer = RewardTrainer(cfg, backbone)
    final = trainer.fit()
    acc = metric(tmp_path / "out", "eval/accuracy")
    assert acc[0] < 0.75 and final["eval/accuracy"] >= 0.85, acc
    # the export is a plain AutoModelForSequenceClassification with the engine's scores
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "final").eval()
    pairs = trainer.data.eval[:6]
    padded = collate_pairs(pairs, trainer.tokenizer.pad_token_id)  # chosen rows, then rejected rows
    trainer.reward.eval()
    with torch.no_grad():
        ours = torch.cat(trainer.scores(trainer.collate(pairs)))  # shared-prefix layout
        theirs = hf(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_shared_prefix_trains_like_separate_sequences(tmp_path, policy_dir, task_dir, backbone):
    """The shared-prefix layout (packed or not) is an exact re-arrangement of the work:
    the same losses and weights as scoring chosen and rejected as separate rows."""
    runs = {}
    for name, flags in {"separate": ["reward.shared_prefix=false"], "shared": [],
                        "packed": ["data.packing=true"]}.items():
        RewardTrainer(rm_cfg(tmp_path / name, policy_dir, task_dir, *flags), backbone).fit()
        runs[name] = (metric(tmp_path / name, "train/loss"), load_file(tmp_path / name / "final/model.safetensors"))
    ref_loss, ref_w = runs["separate"]
    for name in ("shared", "packed"):
        loss, w = runs[name]
        assert loss == pytest.approx(ref_loss, abs=1e-5), (name, loss, ref_loss)
        # Adam divides by sqrt(v): a near-zero gradient's rounding shows in the weights at ~1e-5
        assert all(torch.allclose(w[k], ref_w[k], atol=1e-4) for k in w), name


@pytest.mark.parametrize("rows", [
    # explicit prompt (and DeepSpeed-Chat's extra `response` column)
    [{"prompt": "Describe the apple.\n", "response": "x", "chosen": "the apple is lovely.",
      "rejected": "the apple is awful."}],
    # Anthropic HH: whole dialogues, the prompt is the shared beginning
    [{"chosen": "\n\nHuman: Describe the apple.\n\nAssistant: the apple is lovely.",
      "rejected": "\n\nHuman: Describe the apple.\n\nAssistant: the apple is awful."}],
    # conversational, prompt implicit
    [{"chosen": [{"role": "user", "content": "Describe the apple."},
                 {"role": "assistant", "content": "the apple is lovely."}],
      "rejected": [{"role": "user", "content": "Describe the apple."},
                   {"role": "assistant", "content": "the apple is awful."}]}],
], ids=["explicit", "hh", "conversational"])
def test_each_pair_format_trains(rows, tmp_path, policy_dir, task_dir, backbone):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 16))
    cfg = rm_cfg(tmp_path / "out", policy_dir, task_dir, f"data.path={path}", f"data.eval.path={path}",
                 "train.max_steps=6", f"tokenizer.chat_template={CHAT_TEMPLATE}")
    final = RewardTrainer(cfg, backbone).fit()
    losses = metric(tmp_path / "out", "train/loss")
    assert losses[-1] < losses[0] and final["eval/accuracy"] == 1.0


def test_resume_reproduces(tmp_path, policy_dir, task_dir, backbone, monkeypatch):
    full = RewardTrainer(rm_cfg(tmp_path / "full", policy_dir, task_dir, "checkpoint.every=2"), backbone)
    full.fit()
    cfg = rm_cfg(tmp_path / "cut", policy_dir, task_dir, "checkpoint.every=2")
    real = RewardTrainer.train_step

    def crash(self, mb):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, mb)

    monkeypatch.setattr(RewardTrainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        RewardTrainer(cfg, backbone).fit()
    monkeypatch.setattr(RewardTrainer, "train_step", real)
    RewardTrainer(cfg, backbone).fit()
    assert metric(tmp_path / "cut", "train/loss") == pytest.approx(metric(tmp_path / "full", "train/loss"), abs=1e-6)
    a, b = load_file(tmp_path / "full/final/model.safetensors"), load_file(tmp_path / "cut/final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_stages_and_two_ranks_agree(tmp_path, policy_dir, task_dir, backbone):
    stages = ["0", "1", "2", "3"]
    common = [f"model.path={policy_dir}", f"data.path={task_dir / 'pairs_train.jsonl'}",
              f"data.eval.path={task_dir / 'pairs_eval.jsonl'}", "data.max_samples=128", "data.max_length=48",
              "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=3", "optim.lr=2e-3",
              "model.dropout=0.0", "logging.progress_bar=false"]
    run_two_ranks("rm", tmp_path / "two", stages, common)
    reference = None
    for z in stages:
        cfg = load_stage_config(RMConfig, None, [f"output_dir={tmp_path}/one/zero{z}", f"deepspeed.zero_stage={z}",
                                                 *common])
        RewardTrainer(cfg, backbone).fit()
        one = metric(tmp_path / "one" / f"zero{z}", "train/loss")
        two = metric(tmp_path / "two" / f"zero{z}", "train/loss")
        assert len(one) == 3 and one == pytest.approx(two, abs=1e-5), (z, one, two)
        reference = reference or one
        assert one == pytest.approx(reference, abs=1e-5)  # every ZeRO stage, the same run


def test_scoring_api_matches_the_trainer(tmp_path, policy_dir, task_dir, backbone):
    from rlhf.evaluate import RewardScorer

    cfg = rm_cfg(tmp_path / "out", policy_dir, task_dir, "train.max_steps=2")
    trainer = RewardTrainer(cfg, backbone)
    trainer.fit()
    scorer = RewardScorer(tmp_path / "out" / "final", batch_size=3)
    pairs = trainer.data.eval[:5]
    batch = trainer.collate(pairs)
    trainer.reward.eval()
    with torch.no_grad():
        chosen, rejected = trainer.scores(batch)
    ids = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    assert torch.allclose(torch.tensor(scorer.score_ids(ids)), torch.cat([chosen, rejected]), atol=1e-5)
    # texts: tokenized as the trainer does (EOS appended)
    text = trainer.tokenizer.decode(pairs[0]["chosen_ids"][:-1])
    assert scorer.score([text])[0] == pytest.approx(chosen[0].item(), abs=1e-5)
