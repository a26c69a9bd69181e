"""`rlhf plan`: model states by hand and against DeepSpeed's estimators, the counter it
measures with, and planned peaks within 20% of measured ones for tiny SFT and PPO steps."""

import json

import pytest
import torch

from conftest import TINY_ARCHS
from rlhf.config import DeepSpeedConfig
from rlhf.memory import TensorMemory, fake_tensors
from rlhf.plan import World, load_configs, model_states, Planner

TOLERANCE = 0.2


def test_tensor_memory_counts_new_storages_not_views():
    w = torch.randn(1000, 1000)  # made before: not counted, nor are its views
    with TensorMemory() as mem:
        x = torch.randn(10, 1000)  # 40,000 bytes
        y = x @ w.t()  # w.t() is a view of w; y is new: 40,000 bytes
        z = y.exp()  # 40,000 bytes: 120,000 alive
        del x  # 80,000 alive
    assert mem.peak == 120_000 and mem.current == 80_000
    with fake_tensors(), TensorMemory() as mem:  # fake tensors: counted, never allocated
        big = torch.empty(10**6, 10**4)
    assert mem.peak == 4 * 10**10 and big.shape == (10**6, 10**4)
    del y, z


def test_model_states_by_hand_and_from_deepspeed():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    P, largest = 1_000_000, 100_000
    one, eight = World(1, 1), World(8, 1)
    # fp32 ZeRO-0: weights 4 + Adam 8 per parameter; gradients come from the step's run
    assert model_states(P, P, largest, DeepSpeedConfig(), True, one)[0::2] == (12 * P, True)
    # fp32 ZeRO-3 on 8 ranks: (4 + 4 + 8) / 8 per parameter + the gathered largest layer (4 bytes each)
    assert model_states(P, P, largest, DeepSpeedConfig(zero_stage=3), True, eight)[0] == 2 * P + 4 * largest
    # bf16 ZeRO-3: DeepSpeed's estimator, 18 / 8 per parameter + 4 x largest
    ds = DeepSpeedConfig(zero_stage=3, precision="bf16")
    states, note, grads_in_run = model_states(P, P, largest, ds, True, eight)
    assert states == estimate_zero3_model_states_mem_needs(P, largest, 8, 1, False, False)[1] == 2.25 * P + 4 * largest
    assert "estimator" in note and not grads_in_run
    # bf16 ZeRO-1 (our bf16 optimizer accumulates whole fp32 gradients): 2 + 4 + 12 / 8 per parameter
    assert model_states(P, P, largest, DeepSpeedConfig(zero_stage=1, precision="bf16"), True, eight)[0] == 7.5 * P
    # LoRA, bf16 ZeRO-2: 16-bit weights of all; (2 + 4 + 12) / 8 for the 10,000 trained
    assert model_states(P, 10_000, largest, DeepSpeedConfig(zero_stage=2, precision="bf16"), True,
                        eight)[0] == 2 * P + 18 * 10_000 / 8
    # frozen: weights only, sharded by ZeRO-3
    assert model_states(P, 0, largest, ds, False, eight)[0] == 2 * P / 8


def write_data(tmp_path):
    sft, prompts = tmp_path / "sft.jsonl", tmp_path / "prompts.jsonl"
    sft.write_text("".join(json.dumps({"prompt": "Describe the cat.\n", "response": "the cat is calm."}) + "\n"
                           for _ in range(16)))
    prompts.write_text("".join(json.dumps({"prompt": "Describe the cat.\n"}) + "\n" for _ in range(16)))
    return sft, prompts


def measured_and_planned(tmp_path, tokenizer_dir, backbone, stage, overrides):
    """The plan (CPU kernels) and the counted peak of the same stage's setup and steps at
    the plan's shapes (full-length rows)."""
    from rlhf.trainers.ppo import PPOTrainer
    from rlhf.trainers.sft import SFTTrainer

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "tokenizer": {"path": str(tokenizer_dir)},
                                  stage: {}}))
    world = World(1, 1, "cpu")
    cfgs = load_configs(str(config), [f"{stage}.{o}" for o in overrides], None, world)
    plan = Planner(cfgs, world).plan(stage)
    planned = plan.peak
    cfg = cfgs[stage]
    g = torch.Generator().manual_seed(0)
    with TensorMemory() as mem:
        trainer = (SFTTrainer if stage == "sft" else PPOTrainer)(cfg, backbone)
        trainer.setup()
        V = len(trainer.tokenizer)
        if stage == "sft":
            T = cfg.data.max_length
            for _ in range(2):
                trainer.train_step([trainer.collate([
                    {"input_ids": torch.randint(5, V - 1, (T,), generator=g).tolist(), "loss_mask": [0] + [1] * (T - 1)}
                    for _ in range(cfg.train.micro_batch_size)]) for _ in range(trainer.accumulation)])
        else:
            prompts = [{"prompt_ids": torch.randint(5, V - 1, (cfg.data.max_prompt_length,), generator=g).tolist(),
                        "prompt": ""} for _ in range(trainer.prompts_per_rank)]
            exp = trainer.make_experience(prompts)
            assert exp.response_ids.shape[1] == cfg.rollout.max_new_tokens
            exp.rewards = trainer.compute_rewards(exp)
            exp.advantages, exp.returns = trainer.compute_advantages(exp)
            trainer.learn(exp)
    return planned, mem.peak, plan


ARCH = {**TINY_ARCHS["llama"], "hidden_size": 64, "intermediate_size": 128}


@pytest.mark.parametrize("micro", [8, 4])
def test_planned_sft_peak_is_within_tolerance_of_the_measured_one(micro, tmp_path, tokenizer_dir, backbone):
    sft, _ = write_data(tmp_path)
    planned, measured, plan = measured_and_planned(tmp_path, tokenizer_dir, backbone, "sft", [
        f"data.path={sft}", "data.max_length=64", "train.global_batch_size=8", f"train.micro_batch_size={micro}",
        "train.max_steps=2", "model.dropout=0.0", f"model.arch={json.dumps(ARCH)}", "logging.progress_bar=false"])
    assert abs(planned / measured - 1) < TOLERANCE, (planned, measured)
    # 2 micro-batches accumulated at ZeRO-0: the fp32 gradients (4 bytes each) held between them
    held = [p.bytes for p in plan.parts if p.name.startswith("gradients held")]
    trainable = sum(p.bytes for p in plan.parts if p.name == "model states") / 12  # fp32 ZeRO-0: 12 per parameter
    assert held == ([4 * trainable] if micro == 4 else [])


@pytest.mark.parametrize("extra", [[], ["train.micro_batch_tokens=384"]])  # by tokens: 8 rows of 48 at once
def test_planned_ppo_peak_is_within_tolerance_of_the_measured_one(tmp_path, tokenizer_dir, backbone, extra):
    _, prompts = write_data(tmp_path)
    arch = json.dumps(ARCH)
    planned, measured, _ = measured_and_planned(tmp_path, tokenizer_dir, backbone, "ppo", [
        f"data.path={prompts}", "data.max_length=48", "data.max_prompt_length=16", "rollout.batch_size=8",
        "rollout.max_new_tokens=32", "rollout.min_new_tokens=32", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.max_steps=1", "ppo.epochs=2", "logging.progress_bar=false", "sample_every=0",
        f"policy.model.arch={arch}", f"value.model.arch={arch}", f"reward.model.arch={arch}", *extra])
    assert abs(planned / measured - 1) < TOLERANCE, (planned, measured)


def test_plan_command_warns_when_a_stage_does_not_fit(tmp_path, tokenizer_dir, capsys):
    from rlhf.cli import main

    sft, _ = write_data(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "tokenizer": {"path": str(tokenizer_dir)},
                                  "sft": {"data": {"path": str(sft), "max_length": 32},
                                          "model": {"arch": TINY_ARCHS["llama"]},
                                          "train": {"global_batch_size": 8, "micro_batch_size": 4}}}))
    assert main(["plan", str(config), "--device", "cpu", "--gpu-memory-gb", "10"]) == 0
    assert "peak per rank" in capsys.readouterr().out
    assert main(["plan", str(config), "sft.train.micro_batch_size=8", "--gpu-memory-gb", "0.001"]) == 1
    out = capsys.readouterr().out
    assert "WARNING: does not fit in 0.001 GB per GPU" in out and "WARNING: sft will not fit" in out


def test_plan_counts_lora_adapters_and_tied_weights_on_gpu_kernels(tmp_path, tokenizer_dir):
    """PPO with LoRA on the policy and the value model, tied embeddings, planned for CUDA
    (the fused-attention path, which takes 2D masks): the adapters are the trained
    parameters, a tied embedding is counted once."""
    from transformers import AutoModelForCausalLM

    from rlhf.plan import build_fake

    arch = {**ARCH, "tie_word_embeddings": True}
    _, prompts = write_data(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "tokenizer": {"path": str(tokenizer_dir)},
                                  "ppo": {"data": {"path": str(prompts)}}}))
    lora = ["model.lora.r=8", 'model.lora.target_modules=["q_proj","v_proj"]']
    overrides = [f"ppo.{o}" for o in [f"{r}.model.arch={json.dumps(arch)}" for r in ("policy", "value", "reward")]
                 + [f"{r}.{o}" for r in ("policy", "value") for o in lora]]
    world = World(1, 1, "cuda")
    cfgs = load_configs(str(config), overrides, None, world)
    plan = Planner(cfgs, world).plan("ppo")
    assert plan.peak > 0 and any(p.name == "generation" for p in plan.parts), plan.parts

    planner = Planner(cfgs, world)
    hf = planner.config_of(cfgs["ppo"], cfgs["ppo"].policy.model, "policy.model")
    with torch.device("meta"):
        plain = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf).parameters())  # tied: once
    L, H, r = arch["num_hidden_layers"], arch["hidden_size"], 8
    kv = arch["num_key_value_heads"] * H // arch["num_attention_heads"]
    adapters = L * r * ((H + H) + (H + kv))  # q_proj (H -> H) and v_proj (H -> kv): A (r x in) + B (out x r)
    with fake_tensors():
        fake = build_fake(hf, True, cfgs["ppo"].policy.model, torch.bfloat16, world, gradient_checkpointing=False)
    assert (fake.params, fake.trainable) == (plain + adapters, adapters)


@pytest.mark.parametrize("targets, chunked", [(["q_proj"], True), (["q_proj", "lm_head"], False),
                                             (["o_proj", "output"], True)])  # a name, not the head
def test_plan_takes_the_logit_chunks_the_zero3_run_takes(tmp_path, tokenizer_dir, targets, chunked):
    """Under ZeRO-3 the LM head runs in chunks only when it is a plain linear layer
    (rlhf.lm_head.chunked_head); LoRA on it means all logits at once. The plan reads
    that off the model it builds, as the run does."""
    sft, _ = write_data(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "tokenizer": {"path": str(tokenizer_dir)},
                                  "sft": {"data": {"path": str(sft), "max_length": 32},
                                          "model": {"arch": TINY_ARCHS["llama"], "logits_chunk_mib": 0.5,
                                                    "lora": {"r": 4, "target_modules": targets}},
                                          "deepspeed": {"zero_stage": 3},
                                          "train": {"global_batch_size": 8, "micro_batch_size": 4}}}))
    world = World(2, 1, "cpu")
    plan = Planner(load_configs(str(config), [], None, world), world).plan("sft")
    logits = [p.name for p in plan.parts if "of which logits" in p.name]
    assert logits == ["  of which logits (0.5 MiB chunks)" if chunked else "  of which logits (all at once)"], logits
