"""SFT on tiny models: it learns, the export matches, and the invariants hold
(gradient accumulation equals a bigger batch; a resumed run equals an uninterrupted one)."""

import json
import math
import random

import pytest
import torch

from conftest import TINY_ARCHS
from rlhf.config import SFTConfig, load_stage_config
from rlhf.trainers.base import RunDirError
from rlhf.trainers.sft import SFTTrainer

NOUNS = ["cat", "dog", "sun", "moon", "apple", "river", "stone", "tree"]
ADJS = ["calm", "red", "big", "small", "happy", "sad"]


def write_sft_data(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            noun, adj = rng.choice(NOUNS), rng.choice(ADJS)
            f.write(json.dumps({"prompt": f"Describe the {noun}.\n", "response": f"the {noun} is {adj}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_data")
    return write_sft_data(d / "train.jsonl", 96), write_sft_data(d / "eval.jsonl", 24, seed=1)


def make_cfg(tmp_path, sft_data, tokenizer_dir, *overrides, family="llama"):
    train, ev = sft_data
    base = [f"output_dir={tmp_path / 'out'}", f"tokenizer.path={tokenizer_dir}", f"data.path={train}",
            f"data.eval.path={ev}", "data.max_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.max_steps=6", "optim.lr=3e-3", "optim.scheduler=linear", "model.dropout=0.0",
            "logging.progress_bar=false", f"model.arch={json.dumps(TINY_ARCHS[family])}"]
    return load_stage_config(SFTConfig, None, base + list(overrides))


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.policy.module.state_dict().items()}


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_sft_learns_and_exports(family, tmp_path, sft_data, tokenizer_dir, backbone):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tmp_path, sft_data, tokenizer_dir, "train.max_steps=30", "optim.lr=1e-2", family=family)
    trainer = SFTTrainer(cfg, backbone)
    trainer.setup()
    before = weights(trainer)
    trainer.resume()
    start = trainer.evaluate()["eval/loss"]
    trainer.train()
    final = trainer.finish()
    after = weights(trainer)
    # it learned: eval loss well below the start, every weight moved
    assert final["eval/loss"] < 0.6 * start, (start, final)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    # the export is a plain HF model with the engine's logits
    out = tmp_path / "out"
    assert (out / "config.yaml").exists() and (out / "sft_curves.png").exists()
    hf = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.policy.eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, trainer.policy(input_ids=x).logits, atol=1e-5)


def test_zero3_export_of_tied_embeddings_loads_in_transformers(tmp_path, sft_data, tokenizer_dir, backbone):
    """A tied LM head (SmolLM2, GPT-2, OPT) under ZeRO-3: the state dict names the tied
    weight twice, and the export once wrote the second name's partitioned placeholder
    (shape [0]), which transformers refuses to load."""
    from transformers import AutoModelForCausalLM

    tied = json.dumps({**TINY_ARCHS["llama"], "tie_word_embeddings": True})
    cfg = make_cfg(tmp_path, sft_data, tokenizer_dir, "train.max_steps=2", "deepspeed.zero_stage=3",
                   f"model.arch={tied}")
    trainer = SFTTrainer(cfg, backbone)
    trainer.fit()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").eval()
    assert hf.lm_head.weight.shape == hf.model.embed_tokens.weight.shape
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.policy.eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, trainer.policy(input_ids=x).logits, atol=1e-5)


def test_gradient_accumulation_equals_bigger_batch(tmp_path, sft_data, tokenizer_dir, backbone):
    # batch 8 at once vs 4 micro-batches of 2: the token-normalised loss makes them equal
    # even though the micro-batches hold different numbers of response tokens.
    a = SFTTrainer(make_cfg(tmp_path / "a", sft_data, tokenizer_dir, "train.micro_batch_size=8"), backbone)
    a.fit()
    b = SFTTrainer(make_cfg(tmp_path / "b", sft_data, tokenizer_dir, "train.micro_batch_size=2"), backbone)
    b.fit()
    assert b.accumulation == 4 and a.accumulation == 1
    la, lb = losses(tmp_path / "a" / "out"), losses(tmp_path / "b" / "out")
    assert len(la) == 6 and torch.allclose(torch.tensor(la), torch.tensor(lb), atol=1e-5), (la, lb)
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_resume_reproduces_the_uninterrupted_run(tmp_path, sft_data, tokenizer_dir, backbone, monkeypatch):
    full = SFTTrainer(make_cfg(tmp_path / "full", sft_data, tokenizer_dir, "checkpoint.every=3"), backbone)
    full.fit()

    cfg = make_cfg(tmp_path / "cut", sft_data, tokenizer_dir, "checkpoint.every=3")
    crashing = SFTTrainer(cfg, backbone)
    real_step = SFTTrainer.train_step

    def step_then_crash(self, micro_batches):
        if self.step == 4:
            raise KeyboardInterrupt("simulated crash after step 4")
        return real_step(self, micro_batches)

    monkeypatch.setattr(SFTTrainer, "train_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    monkeypatch.setattr(SFTTrainer, "train_step", real_step)

    resumed = SFTTrainer(cfg, backbone)
    resumed.fit()
    assert resumed.step == 6
    assert losses(tmp_path / "cut" / "out") == pytest.approx(losses(tmp_path / "full" / "out"), abs=1e-6)
    wf, wr = weights(full), weights(resumed)
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k
    # finished: a second run finds final/ and does nothing
    assert SFTTrainer(cfg, backbone).fit() == resumed.final_metrics()


def test_output_dir_is_never_overwritten(tmp_path, sft_data, tokenizer_dir, backbone):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not an rlhf run directory"):
        SFTTrainer(make_cfg(tmp_path, sft_data, tokenizer_dir), backbone).fit()
    assert (out / "precious.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == \
        ["precious.txt"]


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path, sft_data, tokenizer_dir, backbone):
    a = SFTTrainer(make_cfg(tmp_path / "a", sft_data, tokenizer_dir, "train.max_steps=3"), backbone)
    a.fit()
    b = SFTTrainer(make_cfg(tmp_path / "b", sft_data, tokenizer_dir, "train.max_steps=3",
                            "model.gradient_checkpointing=true", "logging.tensorboard=true"), backbone)
    b.fit()
    assert losses(tmp_path / "a" / "out") == pytest.approx(losses(tmp_path / "b" / "out"), abs=1e-5)
    assert list((tmp_path / "b" / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_lora_trains_adapters_only_and_exports_merged(tmp_path, sft_data, tokenizer_dir, backbone):
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(make_cfg(tmp_path, sft_data, tokenizer_dir, "model.lora.r=4", "train.max_steps=4"),
                         backbone)
    trainer.setup()
    before = weights(trainer)
    trainer.resume()
    trainer.train()
    trainer.finish()
    after = weights(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").eval()
    assert not any("lora" in k for k in hf.state_dict())
    x = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.policy.eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, trainer.policy(input_ids=x).logits, atol=1e-5)


def test_fit_trains_with_setup_objects_out_of_the_collectors_walk(tmp_path, sft_data, tokenizer_dir, backbone):
    """The loop runs with what setup built frozen (full collections skip it) and fit hands
    it back at the end, so a finished stage's models can be collected (a pipeline runs
    three stages in one process)."""
    import gc

    seen = {}

    class Watching(SFTTrainer):
        def train(self):
            seen["frozen"] = gc.get_freeze_count()
            super().train()

    assert gc.get_freeze_count() == 0
    Watching(make_cfg(tmp_path, sft_data, tokenizer_dir, "train.max_steps=1"), backbone).fit()
    assert seen["frozen"] > 10000 and gc.get_freeze_count() == 0


@pytest.mark.parametrize("packing", [False, True])
def test_padding_free_rows_give_the_padded_losses(packing, tmp_path, sft_data, tokenizer_dir, backbone):
    """Each micro-batch as one row without padding (what FlashAttention-2 runs as
    variable-length sequences on a GPU; here sdpa with transformers' block mask)."""
    runs = {}
    for flat in ("false", "true"):
        out = tmp_path / flat
        trainer = SFTTrainer(make_cfg(out, sft_data, tokenizer_dir, "train.max_steps=3", f"data.packing={packing}",
                                      f"data.padding_free={flat}"), backbone)
        trainer.fit()
        assert trainer.padding_free == (flat == "true")
        runs[flat] = losses(out / "out")
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-5)


def test_padding_free_is_off_unless_flash_attention_and_refused_for_unknown_families(tmp_path, sft_data,
                                                                                   tokenizer_dir, backbone):
    trainer = SFTTrainer(make_cfg(tmp_path, sft_data, tokenizer_dir), backbone)
    trainer.setup()  # the CPU runs sdpa: auto keeps padded rows
    assert trainer.padding_free is False and trainer.collate(trainer.data.train[:2])["attention_mask"] is not None
    with pytest.raises(ValueError, match="data.padding_free: model type 'gpt2' is not known to keep samples"):
        SFTTrainer(make_cfg(tmp_path / "b", sft_data, tokenizer_dir, "data.padding_free=true", family="gpt2"),
                   backbone).setup()

def test_wandb_offline_logs_and_resumes_the_same_run(tmp_path, sft_data, tokenizer_dir, backbone):
    """logging.wandb with mode offline: no network, the run written under OUTPUT_DIR/wandb,
    the real metrics in it, and a resumed stage continues the same W&B run."""
    wb = ["logging.wandb.project=rlhf-test", "logging.wandb.mode=offline", "checkpoint.every=2"]
    SFTTrainer(make_cfg(tmp_path, sft_data, tokenizer_dir, *wb, "train.max_steps=2"), backbone).fit()
    run_id = (tmp_path / "out" / "wandb_run_id").read_text()
    runs = list((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 1 and b"train/loss" in runs[0].read_bytes() and b"train/grad_norm" in runs[0].read_bytes()
    import shutil

    shutil.rmtree(tmp_path / "out" / "final")  # as if it had stopped after its checkpoint
    SFTTrainer(make_cfg(tmp_path, sft_data, tokenizer_dir, *wb, "train.max_steps=4"), backbone).fit()
    assert (tmp_path / "out" / "wandb_run_id").read_text() == run_id
    assert len(list((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_grad_norm_is_the_real_norm_at_zero0(tmp_path, sft_data, tokenizer_dir, backbone):
    """ZeRO-0 fp32 (DeepSpeed computes no norm there) logs the pre-clipping global norm,
    equal to the norm ZeRO-1 reports for the same step."""
    norms = {}
    for z in (0, 1):
        SFTTrainer(make_cfg(tmp_path / str(z), sft_data, tokenizer_dir, f"deepspeed.zero_stage={z}",
                            "train.max_steps=2"), backbone).fit()
        rows = [json.loads(x) for x in (tmp_path / str(z) / "out" / "metrics.jsonl").read_text().splitlines()]
        norms[z] = [r["train/grad_norm"] for r in rows if "train/grad_norm" in r]
    assert all(math.isfinite(n) and n > 0 for n in norms[0])
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_one_rank_skips_the_gradient_all_reduce_and_changes_nothing(tmp_path, sft_data, tokenizer_dir, backbone):
    """One rank at ZeRO-0: the engines skip DeepSpeed's gradient all-reduce (a copy of
    every gradient into a flat buffer and back); losses and weights are bit for bit those
    of a run with it, gradient accumulation included."""
    runs = {}
    for allreduce in (False, True):
        trainer = SFTTrainer(make_cfg(tmp_path / str(allreduce), sft_data, tokenizer_dir,
                                      "train.micro_batch_size=2", "train.max_steps=3"), backbone)
        trainer.setup()
        assert trainer.policy.enable_backward_allreduce is False
        trainer.policy.enable_backward_allreduce = allreduce
        trainer.resume()
        trainer.train()
        runs[allreduce] = (trainer.finish(), weights(trainer), losses(tmp_path / str(allreduce) / "out"))
    (m0, w0, l0), (m1, w1, l1) = runs[False], runs[True]
    assert len(l0) == 3 and l0 == l1 and m0 == m1
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
