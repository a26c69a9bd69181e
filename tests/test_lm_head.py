"""Log-probabilities, losses and entropy through the chunked LM head equal the
full-logits computations (values and gradients, float32), on every family, with
temperature, tied embeddings, LoRA on the head, and a head not called `lm_head`."""

import copy
import json

import pytest
import torch

from conftest import TINY_ARCHS
from rlhf.config import ModelConfig
from rlhf.lm_head import (CHUNKED_HEAD_MODEL_TYPES, causal_logprobs, chunk_tokens, chunked_head, final_hidden_states,
                          zero3_partitioned)
from rlhf.losses import entropy_from_logits, head_logprobs, lm_loss, logprobs_from_logits, nll_loss
from rlhf.models import load_causal_lm, position_ids_from_mask, unwrap


def test_head_logprobs_equal_full_logits_in_values_and_gradients():
    torch.manual_seed(0)
    N, H, V = 11, 6, 13
    hidden0 = torch.randn(N, H, dtype=torch.float64).float()
    head0 = torch.nn.Linear(H, V)
    labels = torch.randint(0, V, (N,))
    weights = torch.randn(N)  # an arbitrary loss: sum_i w_i * (logp_i + 0.3 * entropy_i)

    def run(chunk, temperature):
        hidden, head = hidden0.clone().requires_grad_(), copy.deepcopy(head0)
        if chunk is None:  # the reference: all logits at once
            logits = head(hidden).float() / temperature
            lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
        else:
            lp, ent = head_logprobs(hidden, head, labels, temperature, True, chunk)
        (weights * (lp + 0.3 * ent)).sum().backward()
        return lp.detach(), ent.detach(), hidden.grad, head.weight.grad, head.bias.grad

    for temperature in (1.0, 0.7):
        ref = run(None, temperature)
        for chunk in (1, 4, N, 0, 100):  # chunks of 1 and 4 (a ragged last one), one chunk, none
            for got, want in zip(run(chunk, temperature), ref):
                assert torch.allclose(got, want, atol=1e-6), (chunk, temperature)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_token_logprobs_equal_full_logits_in_values_and_gradients(bias):
    """The one-node form ZeRO-3 runs inside the output layer's call: the same values and
    gradients (hidden states, weight, bias) as all logits at once."""
    from rlhf.losses import LinearTokenLogprobs

    torch.manual_seed(0)
    N, H, V = 11, 6, 13
    hidden0, head0 = torch.randn(N, H), torch.nn.Linear(H, V, bias=bias)
    labels, weights = torch.randint(0, V, (N,)), torch.randn(N)

    def run(chunk, temperature, entropy_grad=True):
        hidden, head = hidden0.clone().requires_grad_(), copy.deepcopy(head0)
        if chunk is None:
            logits = head(hidden).float() / temperature
            lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
        else:
            lp, ent = LinearTokenLogprobs.apply(hidden, head.weight, head.bias, labels, temperature, True,
                                                entropy_grad, chunk)
        loss = (weights * lp).sum() + ((0.3 * weights * ent).sum() if entropy_grad else 0)
        loss.backward()
        return lp.detach(), ent.detach(), hidden.grad, head.weight.grad, head.bias.grad if bias else None

    for temperature in (1.0, 0.7):
        ref = run(None, temperature)
        for chunk in (1, 4, N, 0, 100):
            for got, want in zip(run(chunk, temperature), ref):
                assert (got is None and want is None) or torch.allclose(got, want, atol=1e-6), (chunk, temperature)
    # entropy off the graph: log-prob gradients only, the entropy still reported
    hidden, head = hidden0.clone().requires_grad_(), copy.deepcopy(head0)
    logits = head(hidden)
    (weights * logprobs_from_logits(logits, labels)).sum().backward()
    got = run(4, 1.0, entropy_grad=False)
    assert torch.allclose(got[1], entropy_from_logits(logits).detach(), atol=1e-6)
    assert torch.allclose(got[2], hidden.grad, atol=1e-6) and torch.allclose(got[3], head.weight.grad, atol=1e-6)


def test_entropy_off_the_graph_and_not_asked_for():
    torch.manual_seed(0)
    hidden, head, labels = torch.randn(5, 4, requires_grad=True), torch.nn.Linear(4, 7), torch.randint(0, 7, (5,))
    lp, ent = head_logprobs(hidden, head, labels, with_entropy=True, chunk_tokens=2, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    lp2, none = head_logprobs(hidden, head, labels, chunk_tokens=2)
    assert none is None and torch.equal(lp.detach(), lp2.detach())
    # uniform logits over V = 7: entropy log 7 (worked out: -7 * (1/7) log(1/7))
    zero = torch.nn.Linear(4, 7)
    torch.nn.init.zeros_(zero.weight), torch.nn.init.zeros_(zero.bias)
    _, ent = head_logprobs(hidden, zero, labels, with_entropy=True, chunk_tokens=2)
    assert torch.allclose(ent, torch.full((5,), torch.log(torch.tensor(7.0)).item()))


def test_chunk_tokens_from_the_memory_budget():
    # 256 MiB of float32 logits at a 152,064-entry vocabulary: 2^28 / (4 * 152064) = 441 positions
    assert chunk_tokens(152064, 256) == 441
    assert chunk_tokens(100, 0) == 0 and chunk_tokens(10**9, 1) == 1


def tiny_model(family, tokenizer, **arch):
    torch.manual_seed(0)
    return load_causal_lm(ModelConfig(arch={**TINY_ARCHS.get(family, {"model_type": family}), **arch},
                                      dropout=0.0), tokenizer)


def batch(tokenizer, B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tokenizer) - 1, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row
    mask[2, -3:] = 0  # a right-padded row
    select = torch.rand(B, T - 5, generator=g) > 0.3
    return ids, mask, select


def full_logits_logprobs(model, ids, mask, first, select, temperature):
    """Today's arithmetic on the whole (B, T, V) logits: the reference."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, first - 1:-1].float() / temperature
    return logprobs_from_logits(logits, ids[:, first:]) * select, entropy_from_logits(logits) * select


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_with_full_logits(model, tokenizer, temperature=0.8, chunk_mib=0.001):
    ids, mask, select = batch(tokenizer)
    first = 5
    weights = torch.randn(select.shape, generator=torch.Generator().manual_seed(1))
    lp, ent = full_logits_logprobs(model, ids, mask, first, select, temperature)
    (weights * (lp - 0.1 * ent)).sum().backward()
    want = lp.detach(), ent.detach(), grads(model)
    model.zero_grad()
    assert chunk_tokens(model.config.vocab_size, chunk_mib) < int(select.sum())  # several chunks
    lp, ent = causal_logprobs(model, ids, mask, position_ids_from_mask(mask), first, select, temperature, True,
                              chunk_mib=chunk_mib)
    (weights * (lp - 0.1 * ent)).sum().backward()
    got = lp.detach(), ent.detach(), grads(model)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert torch.allclose(got[2][name], want[2][name], atol=1e-5), name
    model.zero_grad()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_causal_logprobs_equal_full_logits(family, tokenizer):
    compare_with_full_logits(tiny_model(family, tokenizer), tokenizer)


def test_tied_embeddings_and_a_head_not_called_lm_head(tokenizer):
    tied = tiny_model("llama", tokenizer, tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    compare_with_full_logits(tied, tokenizer)
    biogpt = tiny_model("biogpt", tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256)
    assert "biogpt" in CHUNKED_HEAD_MODEL_TYPES and not hasattr(biogpt, "lm_head")  # its head: output_projection
    compare_with_full_logits(biogpt, tokenizer)


def test_lora_on_the_head(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", tokenizer),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # LoRA starts at zero; perturb it so that the adapter matters
            torch.nn.init.normal_(p, std=0.1)
    assert any("lm_head" in n and p.requires_grad for n, p in model.named_parameters())
    compare_with_full_logits(model, tokenizer)


def test_a_family_that_changes_logits_after_the_head_takes_the_full_path(tokenizer):
    # Gemma 2 soft-caps its logits after the head: the chunked path would miss that, so
    # the family is not in the list and the full logits are used, with the same result.
    model = tiny_model("gemma2", tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
                       max_position_embeddings=256)
    assert "gemma2" not in CHUNKED_HEAD_MODEL_TYPES
    compare_with_full_logits(model, tokenizer)


def test_final_hidden_states_skip_the_logits(tokenizer):
    model = tiny_model("llama", tokenizer)
    ids, mask, _ = batch(tokenizer)
    hidden, head = final_hidden_states(model, input_ids=ids, attention_mask=mask, logits_to_keep=4)
    assert hidden.shape == (3, 4, 32) and head is model.lm_head
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=4).logits
    assert torch.allclose(head(hidden), out, atol=1e-6)


def test_sft_loss_from_chunks_equals_lm_loss(tokenizer):
    model = tiny_model("llama", tokenizer)
    ids, mask, _ = batch(tokenizer)
    loss_mask = torch.zeros_like(mask)
    loss_mask[:, 6:] = mask[:, 6:]
    full = lm_loss(model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits,
                   ids, loss_mask, 7.0)
    lp, _ = causal_logprobs(model, ids, mask, position_ids_from_mask(mask), 6, loss_mask[:, 6:], chunk_mib=0.001)
    assert torch.allclose(nll_loss(lp, loss_mask[:, 6:], 7.0), full, atol=1e-6)


def test_sft_under_zero3_with_chunks_equals_full_logits(tmp_path, tokenizer_dir, backbone):
    """The LM head's weight is a partitioned parameter under ZeRO-3: the chunks run inside
    the head's one call per forward (gathered there, and again for the backward); the
    losses equal the full logits' (2 ranks with uneven targets: tests/test_hangs.py)."""
    from test_sft import losses, write_sft_data

    from rlhf.config import SFTConfig, load_stage_config
    from rlhf.trainers.sft import SFTTrainer

    data = write_sft_data(tmp_path / "train.jsonl", 32)
    runs = {}
    for name, chunk_mib in [("full", 0), ("chunks", 0.0134)]:
        out = tmp_path / name
        cfg = load_stage_config(SFTConfig, None, [
            f"output_dir={out}", f"tokenizer.path={tokenizer_dir}", f"data.path={data}", "data.max_length=32",
            "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=3", "optim.lr=3e-3",
            "model.dropout=0.0", "logging.progress_bar=false", f"model.arch={json.dumps(TINY_ARCHS['llama'])}",
            "deepspeed.zero_stage=3", f"model.logits_chunk_mib={chunk_mib}"])
        trainer = SFTTrainer(cfg, backbone)
        trainer.fit()
        # the head is partitioned, and chunked inside its one call per forward
        assert chunked_head(trainer.policy, chunk_mib) == (chunk_mib > 0)
        assert zero3_partitioned(unwrap(trainer.policy).get_output_embeddings())
        runs[name] = losses(out)
    assert len(runs["chunks"]) == 3
    assert runs["chunks"] == pytest.approx(runs["full"], abs=1e-5)

