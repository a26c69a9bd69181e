"""Models without DeepSpeed: packing keeps samples apart, scores ignore padding, exports load in
plain transformers with the same outputs (LoRA merged)."""

import pytest
import torch

from conftest import PACKING_ARCHS, TINY_ARCHS
from rlhf.config import LoraConfig, ModelConfig
from rlhf.data.batching import collate_pairs, collate_pairs_shared_prefix, collate_sft, pack
from rlhf.losses import lm_loss
from rlhf.trainers.sft import PACKING_MODEL_TYPES, check_packing_supported
from rlhf.models import (ScalarModel, apply_lora, load_causal_lm, load_scalar_model, pair_scores, save_pretrained,
                         sequence_scores)
from rlhf.trainers.reward import SHARED_PREFIX_MODEL_TYPES


def model_cfg(family, **kw):
    return ModelConfig(arch=dict({**TINY_ARCHS, **PACKING_ARCHS}[family]), dropout=0.0, **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "qwen2"])
def test_packing_gives_the_same_per_sample_loss(family, tokenizer):
    assert family in PACKING_MODEL_TYPES
    torch.manual_seed(0)
    model = load_causal_lm(model_cfg(family), tokenizer).eval()
    g = torch.Generator().manual_seed(1)
    exs = []
    for n in (5, 9, 7):
        ids = torch.randint(3, len(tokenizer) - 1, (n,), generator=g).tolist()
        exs.append({"input_ids": ids, "loss_mask": [0, 0] + [1] * (n - 2)})
    packed = collate_sft(pack(exs, max_length=64), tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] == 1  # all three in one sequence
    with torch.no_grad():
        # use_cache=False: with a cache transformers does not look for packed sequences
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        start = 0
        for e in exs:
            n = len(e["input_ids"])
            alone = collate_sft([e], tokenizer.pad_token_id)
            ref = lm_loss(model(input_ids=alone["input_ids"]).logits, alone["input_ids"], alone["loss_mask"])
            got = lm_loss(logits[:, start:start + n], packed["input_ids"][:, start:start + n],
                          packed["loss_mask"][:, start:start + n])
            assert torch.allclose(got, ref, atol=1e-5), (family, got, ref)
            start += n


def test_packing_is_refused_for_models_that_would_attend_across_samples(tmp_path):
    # OPT derives its mask without position ids, so packed samples would see each other.
    with pytest.raises(ValueError, match="data.packing: model type 'opt' is not known to keep packed samples"):
        check_packing_supported("opt")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_scores_ignore_padding_and_match_the_hf_export(family, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = ScalarModel(load_scalar_model(model_cfg(family), tokenizer)).eval()
    pairs = [{"chosen_ids": [5, 6, 7, 8, 9], "rejected_ids": [5, 6], "margin": 0.0},
             {"chosen_ids": [10, 11, 12], "rejected_ids": [13, 14, 15, 16, 17, 18, 19], "margin": 0.0}]
    right = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        s_right = sequence_scores(model, right["input_ids"], right["attention_mask"])
        # left padding: same rows, pads first
        seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
        from rlhf.data.batching import pad

        left_ids = pad(seqs, tokenizer.pad_token_id, side="left")
        left_mask = pad([[1] * len(s) for s in seqs], 0, side="left")
        s_left = sequence_scores(model, left_ids, left_mask)
        alone = torch.stack([sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
    assert torch.allclose(s_right, s_left, atol=1e-5) and torch.allclose(s_right, alone, atol=1e-5)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(model, state, tokenizer, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.num_labels == 1
    with torch.no_grad():
        s_hf = hf(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits.squeeze(-1)
    assert torch.allclose(s_hf, s_right, atol=1e-5)


def test_lora_is_merged_on_export(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = apply_lora(load_causal_lm(model_cfg("llama"), tokenizer), LoraConfig(r=4, alpha=8), "CAUSAL_LM")
    with torch.no_grad():  # make the adapters non-zero so merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=x).logits
    save_pretrained(model, {k: v.clone() for k, v in model.state_dict().items()}, tokenizer, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, ref, atol=1e-5)


def test_value_model_with_lora_trains_adapters_and_its_head(tokenizer):
    """PPO's value model with `value.model.lora.r`: PEFT wraps the score head in a
    trainable copy; ScalarModel reads through it, and gradients reach adapters and head."""
    torch.manual_seed(0)
    model = ScalarModel(apply_lora(load_scalar_model(model_cfg("llama"), tokenizer), LoraConfig(r=4), "SEQ_CLS"))
    x = torch.tensor([[5, 6, 7, 8]])
    model(x, torch.ones_like(x)).sum().backward()
    # (lora_B starts at zero, so only lora_B and the head have a gradient at the first step)
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("score.modules_to_save" in n for n in trained) and any("lora_B" in n for n in trained)
    assert not any("lora" not in n and "score" not in n for n in trained)  # the body stays frozen


def test_pad_token_is_added_distinct_from_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf.config import TokenizerConfig
    from rlhf.models import load_tokenizer

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2}, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>").save_pretrained(tmp_path)
    tok = load_tokenizer(TokenizerConfig(path=str(tmp_path)))
    assert tok.pad_token_id not in (None, tok.eos_token_id) and len(tok) == 4
    model = load_causal_lm(ModelConfig(arch=dict(TINY_ARCHS["gpt2"])), tok)
    assert model.get_input_embeddings().weight.shape[0] >= 4 and model.config.pad_token_id == tok.pad_token_id


SHARED_PREFIX_PAIRS = [
    {"chosen_ids": [5, 6, 7, 8, 9], "rejected_ids": [5, 6, 10], "margin": 0.0},           # prompt shared
    {"chosen_ids": [11, 12], "rejected_ids": [11, 12, 13, 14], "margin": 0.0},           # chosen inside rejected
    {"chosen_ids": [15, 16, 17], "rejected_ids": [18, 19], "margin": 0.0},               # nothing shared
    {"chosen_ids": [20, 21, 22, 23], "rejected_ids": [20, 21], "margin": 0.0},           # rejected inside chosen
    {"chosen_ids": [24, 25, 26, 27, 28, 29, 30], "rejected_ids": [24, 31], "margin": 0.0},  # longest: rows this wide
]


@pytest.mark.parametrize("family", sorted(SHARED_PREFIX_MODEL_TYPES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_scores_and_gradients_equal_separate_rows(family, attn, tokenizer):
    torch.manual_seed(0)
    model = ScalarModel(load_scalar_model(model_cfg(family, attn_implementation=attn), tokenizer)).eval()

    def scores_and_grads(batch):
        model.zero_grad()
        chosen, rejected = pair_scores(model, batch, "cpu")
        (chosen - 2 * rejected).sum().backward()
        return torch.cat([chosen, rejected]).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = scores_and_grads(collate_pairs(SHARED_PREFIX_PAIRS, tokenizer.pad_token_id))
    for packed in (False, True):
        batch = collate_pairs_shared_prefix(SHARED_PREFIX_PAIRS, tokenizer.pad_token_id, pack=packed)
        got, grads = scores_and_grads(batch)
        assert torch.allclose(got, ref, atol=1e-5), (family, attn, packed, got, ref)
        assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-5) for n in grads), (family, attn, packed)
    # The mask is what keeps the suffixes apart: letting rejected see chosen changes scores.
    batch = collate_pairs_shared_prefix(SHARED_PREFIX_PAIRS, tokenizer.pad_token_id, pack=False)
    width = batch["input_ids"].shape[1]
    batch["attention_mask"] = batch["attention_mask"] | torch.ones(width, width, dtype=torch.bool).tril()
    with torch.no_grad():
        leaky = torch.cat(pair_scores(model, batch, "cpu"))
    assert not torch.allclose(leaky, ref, atol=1e-4)


def test_shared_prefix_refuses_unknown_families_and_other_attention(tmp_path):
    from rlhf.config import ConfigError, RMConfig, load_stage_config
    from rlhf.trainers.reward import check_shared_prefix_supported

    with pytest.raises(ValueError, match="reward.shared_prefix: model type 'bloom' is not known"):
        check_shared_prefix_supported("bloom")
    (tmp_path / "p.jsonl").write_text("")
    base = [f"output_dir={tmp_path}", "model.arch={model_type: llama}", f"data.path={tmp_path / 'p.jsonl'}"]
    with pytest.raises(ConfigError, match="model.attn_implementation: reward.shared_prefix needs a custom"):
        load_stage_config(RMConfig, None, [*base, "model.attn_implementation=flash_attention_2"])
    load_stage_config(RMConfig, None, [*base, "model.attn_implementation=flash_attention_2",
                                       "reward.shared_prefix=false"])
    with pytest.raises(ConfigError, match="data.packing: packing pairs side by side in rows needs"):
        load_stage_config(RMConfig, None, [*base, "data.packing=true", "reward.shared_prefix=false"])


def test_attention_auto_picks_flash_attention_only_where_it_runs(monkeypatch):
    from transformers import AutoConfig

    from rlhf.models import attn_implementation

    llama, bloom = AutoConfig.for_model("llama"), AutoConfig.for_model("bloom")
    assert attn_implementation("auto", llama, torch.bfloat16) is None  # no CUDA here: transformers' choice (sdpa)
    assert attn_implementation("eager", llama, torch.float32) == "eager"  # other values pass through
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: True)
    assert attn_implementation("auto", llama, torch.bfloat16) == "flash_attention_2"
    assert attn_implementation("auto", llama, torch.float32) is None  # FlashAttention has no fp32 kernels
    assert attn_implementation("auto", bloom, torch.bfloat16) is None  # a family without FlashAttention support
