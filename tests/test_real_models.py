"""Real checkpoints as they come: tiny models of families whose tokenizers disagree on
pad, EOS, BOS and templates (tests/families.py), and SmolLM2-135M-Instruct itself,
read from a GGUF, through SFT, the reward model and PPO; the exports load and generate
in plain transformers and stop where our rollouts stop."""

import json
import re
from pathlib import Path

import pytest
import torch

from families import FAMILIES, chat_rows
from rlhf.config import PPOConfig, RMConfig, SFTConfig, load_stage_config
from rlhf.rollout import full_sequence, response_logprobs
from rlhf.tokens import stop_token_ids
from rlhf.trainers.ppo import PPOTrainer
from rlhf.trainers.reward import RewardTrainer
from rlhf.trainers.sft import SFTTrainer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": r["messages"][:1], "chosen": r["messages"][1:],
             "rejected": [{"role": "assistant", "content": "No."}]} for r in chat_rows(n, seed=1)]


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": r["messages"][:1]} for r in chat_rows(n, seed=2)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def greedy_reply(model_dir: Path, user: str, max_new_tokens: int = 12) -> tuple[list[int], list[int]]:
    """(new token ids, stop ids) of plain transformers' greedy generate, with the
    export's own generation_config (which lists every stop token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist(), stop_token_ids(tok, model_dir)


def check_export_agrees(model_dir: Path) -> None:
    """Tokenizer, config and generation_config of an export name the same pad, and the
    pad is none of the stop tokens."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    assert config.pad_token_id == tok.pad_token_id
    stops = stop_token_ids(tok, model_dir)
    assert tok.pad_token_id not in stops
    if (model_dir / "generation_config.json").exists():
        gen = GenerationConfig.from_pretrained(model_dir)
        assert gen.pad_token_id == tok.pad_token_id
        gen_eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        assert sorted(gen_eos) == stops


def rollout_endings(trainer, exp) -> list[int]:
    """The stop token each response of `exp` ended with, checking that every response
    holding a stop token ends at its first one (action mask, hence the reward position)."""
    stops = set(trainer.stop_ids)
    ended_with = []
    for ids, mask in zip(exp.response_ids.tolist(), exp.action_mask.tolist()):
        kept = ids[:sum(mask)]
        first = next((i for i, t in enumerate(ids) if t in stops), None)
        assert first is None or first == len(kept) - 1
        if first is not None:
            ended_with.append(kept[-1])
    return ended_with


@pytest.fixture(scope="module")
def family_sft(tmp_path_factory, family_dirs, backbone):
    """Each family's tiny model after SFT on short chats (it learns to end its reply)."""
    root = tmp_path_factory.mktemp("family_sft")
    data = write_jsonl(root / "chats.jsonl", chat_rows(96))
    out = {}
    for name, d in family_dirs.items():
        if FAMILIES[name]["template"] is None:
            continue
        cfg = load_stage_config(SFTConfig, None, [
            f"output_dir={root / name}", f"model.path={d}", f"data.path={data}", "data.max_length=64",
            "train.global_batch_size=16", "train.micro_batch_size=16", "train.epochs=8", "optim.lr=3e-3",
            "optim.warmup_steps=2", "model.dropout=0.0", "logging.progress_bar=false"])
        SFTTrainer(cfg, backbone).fit()
        out[name] = root / name / "final"
    return out


@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILIES[n]["template"] is not None])
def test_family_export_stops_at_its_end_token(name, family_sft):
    final = family_sft[name]
    check_export_agrees(final)
    new, stops = greedy_reply(final, "Describe the apple in one word.")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    end = tok.convert_tokens_to_ids(FAMILIES[name]["end"])
    # The model learnt "The <noun> is ok." + the template's end-of-turn token, and plain
    # transformers stops there (on llama3, <|eot_id|> is not the tokenizer's EOS).
    assert end in new, tok.convert_ids_to_tokens(new)
    assert new.index(end) == len(new) - 1
    assert re.fullmatch(r"The (apple|river|stone) is ok\.", tok.decode(new[:-1]).strip())


def test_bare_family_without_template_adds_pad_and_trains(tmp_path, family_dirs, task_dir, backbone):
    """No chat template, no pad, nothing to reuse: `<|pad|>` is added, the embeddings grow
    by its row, and plain text rows train."""
    d = family_dirs["bare"]
    rows = [{"prompt": "Say ok.", "response": "ok"}] * 32
    cfg = load_stage_config(SFTConfig, None, [
        f"output_dir={tmp_path}", f"model.path={d}", f"data.path={write_jsonl(tmp_path.parent / 'bare.jsonl', rows)}",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.max_steps=3", "logging.progress_bar=false"])
    SFTTrainer(cfg, backbone).fit()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert tok.pad_token == "<|pad|>" and model.get_input_embeddings().weight.shape[0] == len(tok)
    check_export_agrees(tmp_path / "final")


@pytest.mark.parametrize("name", ["llama3", "chatml_pad_is_eos"])
def test_family_rm_and_ppo_end_at_the_end_token(name, family_sft, tmp_path, backbone):
    """PPO's rollouts end at the template's end token (not only the tokenizer's EOS): the
    EOS rate of an SFT policy that learnt to stop is high, the reward lands there."""
    sft = family_sft[name]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32))
    rm_cfg = load_stage_config(RMConfig, None, [
        f"output_dir={tmp_path / 'rm'}", f"model.path={sft}", f"data.path={pairs}", "data.max_length=64",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.max_steps=2", "logging.progress_bar=false"])
    RewardTrainer(rm_cfg, backbone).fit()
    check_export_agrees(tmp_path / "rm" / "final")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(32))
    ppo = load_stage_config(PPOConfig, None, [
        f"output_dir={tmp_path / 'ppo'}", f"policy.model.path={sft}", f"value.model.path={tmp_path / 'rm' / 'final'}",
        f"reward.model.path={tmp_path / 'rm' / 'final'}", f"data.path={prompts}", "rollout.batch_size=16",
        "rollout.max_new_tokens=12", "rollout.temperature=0.5", "train.global_batch_size=16",
        "train.micro_batch_size=8", "train.max_steps=2", "logging.progress_bar=false", "sample_every=0"])
    trainer = PPOTrainer(ppo, backbone)
    trainer.fit()
    rows = [r for r in metrics(tmp_path / "ppo") if "ppo/eos_rate" in r]
    assert rows[0]["ppo/ratio_at_start"] == pytest.approx(1.0, abs=1e-5)
    check_export_agrees(tmp_path / "ppo" / "final")
    ended_with = rollout_endings(trainer, trainer.make_experience([trainer.data.train[i] for i in range(16)]))
    assert ended_with.count(trainer.tokenizer.convert_tokens_to_ids(FAMILIES[name]["end"])) >= 4, ended_with
    assert rows[0]["ppo/eos_rate"] >= 0.25


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, smollm2_gguf, backbone):
    """SFT (from the GGUF file itself), RM and PPO on SmolLM2, a few steps each."""
    root = tmp_path_factory.mktemp("smollm2")
    sft_data = write_jsonl(root / "chats.jsonl", chat_rows(16))
    pairs = write_jsonl(root / "pairs.jsonl", pair_rows(8))
    prompts = write_jsonl(root / "prompts.jsonl", prompt_rows(8))
    common = ["logging.progress_bar=false", "optim.lr=1e-5", "data.max_length=64"]
    SFTTrainer(load_stage_config(SFTConfig, None, [
        f"output_dir={root / 'sft'}", f"model.path={smollm2_gguf}", f"data.path={sft_data}",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=2", *common]), backbone).fit()
    RewardTrainer(load_stage_config(RMConfig, None, [
        f"output_dir={root / 'rm'}", f"model.path={root / 'sft' / 'final'}", f"data.path={pairs}",
        "train.global_batch_size=4", "train.micro_batch_size=4", "train.max_steps=2", *common]), backbone).fit()
    trainer = PPOTrainer(load_stage_config(PPOConfig, None, [
        f"output_dir={root / 'ppo'}", f"policy.model.path={root / 'sft' / 'final'}",
        f"value.model.path={root / 'rm' / 'final'}", f"reward.model.path={root / 'rm' / 'final'}",
        f"data.path={prompts}", "rollout.batch_size=4", "rollout.max_new_tokens=24", "train.global_batch_size=4",
        "train.micro_batch_size=4", "train.max_steps=1", "logging.progress_bar=false", "policy.optim.lr=1e-6",
        "value.optim.lr=1e-6", "sample_every=0"]), backbone)
    trainer.fit()
    return root, trainer


def test_smollm2_exports_load_and_stop_at_im_end(smollm2_run):
    from transformers import AutoModelForSequenceClassification

    root, _ = smollm2_run
    for stage in ("sft", "rm", "ppo"):
        check_export_agrees(root / stage / "final")
    rm = AutoModelForSequenceClassification.from_pretrained(root / "rm" / "final")
    assert rm.config.num_labels == 1
    new, stops = greedy_reply(root / "ppo" / "final", "Describe the river in one word.", max_new_tokens=48)
    assert new[-1] == 2 and stops == [2]  # <|im_end|>, SmolLM2's end of turn (and its EOS)
    assert 2 not in new[:-1]
    ppo = [r for r in metrics(root / "ppo") if "ppo/ratio_at_start" in r][0]
    assert ppo["ppo/ratio_at_start"] == pytest.approx(1.0, abs=1e-5)
    assert ppo["ppo/eos_rate"] >= 0.5  # the instruct model ends most replies within 24 tokens


def test_smollm2_engine_logprobs_equal_the_export(smollm2_run):
    """The trained policy inside the DeepSpeed engine and its export in plain
    transformers give the same log-probs of a rollout."""
    from transformers import AutoModelForCausalLM

    root, trainer = smollm2_run
    prompts = [trainer.data.train[i] for i in range(4)]
    exp = trainer.make_experience(prompts)
    ids, mask = full_sequence(exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.action_mask)
    P = exp.prompt_ids.shape[1]
    with torch.no_grad():
        ours = response_logprobs(trainer.policy, ids, mask, P)
        plain = AutoModelForCausalLM.from_pretrained(root / "ppo" / "final", dtype=torch.float32).eval()
        theirs = response_logprobs(plain, ids, mask, P)
    m = exp.action_mask.bool()
    assert torch.allclose(ours[m], theirs[m], atol=1e-4), (ours[m] - theirs[m]).abs().max()
    assert set(rollout_endings(trainer, exp)) <= {2}  # <|im_end|>


def test_smollm2_gradient_checkpointing_and_tied_embeddings(smollm2_dir, tokenizer_dir):
    """Gradient checkpointing on the real model gives the same loss and gradients; the
    LM head stays tied to the embeddings after loading with our pad choice."""
    from rlhf.config import ModelConfig, TokenizerConfig
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(TokenizerConfig(path=str(smollm2_dir)))
    batch = tok(["<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>"] * 2,
                return_tensors="pt")
    grads = []
    for ckpt in (False, True):
        model = load_causal_lm(ModelConfig(path=str(smollm2_dir), gradient_checkpointing=ckpt), tok)
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        model.train()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads.append((loss.item(), model.model.layers[3].mlp.down_proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_smollm2_grpo_groups_computed_once_equal_separate_rows(smollm2_run, tmp_path, backbone):
    """GRPO on SmolLM2 (its chat template, a 49k vocabulary), LoRA, 4 prompts x 4
    responses: one step with each prompt computed once per group (prefill, reference
    pass, update: rollout.shared_prefix) gives the responses, losses and exported
    (adapters merged) weights of separate rows (configs/smollm2.yaml's grpo section runs
    this way)."""
    from safetensors.torch import load_file

    from rlhf.config import GRPOConfig
    from rlhf.trainers.algorithms import GRPOTrainer

    root, _ = smollm2_run
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    (tmp_path / "reward.py").write_text(
        "def score(prompts, responses, **_):\n    return [min(len(r), 40) / 10 for r in responses]\n")
    runs = {}
    for on in ("true", "false"):
        out = tmp_path / on
        trainer = GRPOTrainer(load_stage_config(GRPOConfig, None, [
            f"output_dir={out}", f"policy.model.path={root / 'sft' / 'final'}", "policy.model.lora.r=8",
            f"reward.function={tmp_path / 'reward.py'}:score", f"data.path={prompts}", "data.max_length=64",
            "data.max_prompt_length=48",
            "rollout.batch_size=4", "rollout.n=4", "rollout.max_new_tokens=12", "train.global_batch_size=16",
            "train.micro_batch_size=8", "train.max_steps=1", "grpo.epochs=1", "policy.optim.lr=1e-3",
            f"rollout.shared_prefix={on}", "logging.progress_bar=false", "sample_every=0"]), backbone)
        trainer.fit()
        assert trainer.shared_prefix == (on == "true")
        runs[on] = [r for r in metrics(out) if "grpo/score" in r][0], load_file(out / "final" / "model.safetensors")
    (a, wa), (b, wb) = runs["true"], runs["false"]
    assert a["grpo/score"] == b["grpo/score"] and a["grpo/score_std"] > 0  # the same responses, not all alike
    for key in ("grpo/policy_loss", "grpo/kl", "grpo/policy_grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
