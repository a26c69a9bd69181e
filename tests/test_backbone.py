"""The DeepSpeed JSON built from the typed config: communication settings from the
model's hidden size, overlap on GPUs only, ZeRO++ hierarchical partitioning, and
`deepspeed.extra` winning over all of it."""

import os
from pathlib import Path

import pytest

from rlhf.backbone import deepspeed_config, hidden_size_of
from rlhf.config import ConfigError, DeepSpeedConfig


class FakeAccelerator:
    def __init__(self, name):
        self.name = name

    def device_name(self, *args):
        return self.name


@pytest.fixture
def on_device(monkeypatch):
    def use(name):
        monkeypatch.setattr("rlhf.backbone.get_accelerator", lambda: FakeAccelerator(name))

    return use


def test_buckets_and_thresholds_follow_the_hidden_size(on_device):
    on_device("cuda")
    zero = deepspeed_config(DeepSpeedConfig(zero_stage=3), 4, 2, 8, hidden_size=4096)["zero_optimization"]
    # the Hugging Face integration's "auto" values: h^2, 0.9 h^2, 10 h
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 4096**2 == 16_777_216
    assert zero["stage3_prefetch_bucket_size"] == 15_099_494
    assert zero["stage3_param_persistence_threshold"] == 40_960
    assert zero["stage3_max_reuse_distance"] == 12 * 4096**2  # about one layer, not DeepSpeed's 1e9
    assert zero["overlap_comm"] is True
    zero2 = deepspeed_config(DeepSpeedConfig(zero_stage=2), 4, 2, 8, hidden_size=2048)["zero_optimization"]
    assert zero2["reduce_bucket_size"] == 2048**2 and "stage3_prefetch_bucket_size" not in zero2


def test_no_overlap_on_the_cpu_and_nothing_guessed_without_a_hidden_size(on_device):
    on_device("cpu")
    zero = deepspeed_config(DeepSpeedConfig(zero_stage=3), 4, 1, 1)["zero_optimization"]
    assert zero["overlap_comm"] is False
    assert not {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "stage3_max_reuse_distance"} & set(zero)
    assert deepspeed_config(DeepSpeedConfig(zero_stage=0), 4, 1, 1)["zero_optimization"] == {"stage": 0}


def test_extra_overrides_the_generated_values(on_device):
    on_device("cuda")
    ds = DeepSpeedConfig(zero_stage=3, extra={"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 5e8}})
    zero = deepspeed_config(ds, 1, 1, 2, hidden_size=64)["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["reduce_bucket_size"] == 5e8
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)  # untouched keys stay


def test_hierarchical_partitioning(on_device):
    on_device("cuda")
    ds = DeepSpeedConfig(zero_stage=3, zero_hpz_partition_size=8)
    assert deepspeed_config(ds, 1, 1, 16)["zero_optimization"]["zero_hpz_partition_size"] == 8
    with pytest.raises(ValueError, match="zero_hpz_partition_size=8 must divide the number of ranks \\(12\\)"):
        deepspeed_config(ds, 1, 1, 12)
    assert "zero_hpz_partition_size" not in deepspeed_config(DeepSpeedConfig(zero_stage=3), 1, 1, 16)[
        "zero_optimization"]


def test_hpz_needs_zero3(tmp_path):
    from rlhf.config import SFTConfig, load_stage_config

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ConfigError, match="deepspeed.zero_hpz_partition_size.*needs zero_stage 3"):
        load_stage_config(SFTConfig, None, [f"data.path={data}", "model.arch={model_type: llama}",
                                            "deepspeed.zero_hpz_partition_size=8"])


def test_hidden_size_is_found_under_wrappers(tokenizer):
    from conftest import TINY_ARCHS
    from rlhf.config import ModelConfig
    from rlhf.models import ScalarModel, load_scalar_model

    model = ScalarModel(load_scalar_model(ModelConfig(arch=TINY_ARCHS["gpt2"]), tokenizer))
    assert hidden_size_of(model) == 32  # gpt2's n_embd, behind our wrapper


def test_cuda_allocator_setting_leaves_the_users_value():
    from rlhf.backbone import CUDA_ALLOCATOR, set_cuda_allocator

    env = {}
    set_cuda_allocator(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOCATOR}
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    set_cuda_allocator(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}


def test_cpu_runs_keep_freed_memory():
    """keep_freed_cpu_memory (glibc): a large buffer freed and made again is no longer
    fresh memory (without it, every touched page of it faults again); a MALLOC_*
    variable in the environment leaves glibc as it is. In a process of its own, since
    the setting is process-wide."""
    import subprocess
    import sys

    code = """
import resource, torch
from rlhf.backbone import keep_freed_cpu_memory

def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20 // 4).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

faults()
before = faults()
assert not keep_freed_cpu_memory({"MALLOC_TRIM_THRESHOLD_": "131072"})
assert faults() > 8000, "glibc left alone maps a 64 MiB buffer afresh"
assert keep_freed_cpu_memory({})
for _ in range(3):  # the heap grows to hold the buffer (the first calls after the setting may fault)
    faults()
after = faults()
print(before, after)
assert before > 8000 and after < 1000, (before, after)
"""
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root}, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
