"""Where a model's files come from: a local Hugging Face directory, a hub name, or a
GGUF checkpoint (converted once per machine into a cached HF directory).

`check_model_source` runs before any work starts, so a path that does not exist or
a GGUF that cannot be read is one line naming the config key, not a traceback after
tokenization. `model_dir` is what loaders call: it hands back a directory (or hub
name) that `from_pretrained` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from rlhf.config import ModelConfig

GGUF_MAGIC = b"GGUF"


def models_cache() -> Path:
    """Where converted GGUF checkpoints live: $RLHF_MODEL_CACHE, else $RLHF_CACHE/models
    (default ~/.cache/rlhf/models)."""
    if os.environ.get("RLHF_MODEL_CACHE"):
        return Path(os.environ["RLHF_MODEL_CACHE"])
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf") / "models"


def gguf_location(cfg: ModelConfig) -> tuple[str, str] | None:
    """(directory or hub repo, file name) of a GGUF checkpoint, or None for other models."""
    if cfg.path is None:
        return None
    if cfg.gguf_file is not None:
        return (str(Path(cfg.path).expanduser()) if looks_local(cfg.path) else cfg.path), cfg.gguf_file
    if cfg.path.endswith(".gguf"):
        p = Path(cfg.path).expanduser()  # configs name ~/.cache/rlhf/downloads/...
        return str(p.parent), p.name
    return None


def looks_local(path: str) -> bool:
    """Whether `path` names a local path rather than a hub repo (`name` or `org/name`)."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") >= 2 or Path(path).expanduser().exists()


def check_model_source(cfg: ModelConfig, key: str) -> None:
    """Refuse, in one line naming `key` and the path, a model that cannot be loaded:
    a local directory that does not exist or holds no config.json, a GGUF file that is
    missing or not a GGUF, a hub name that neither the hub nor its local cache knows."""
    if cfg.path is None:
        return
    gguf = gguf_location(cfg)
    if gguf is not None:
        where, name = gguf
        if looks_local(where) or cfg.path.endswith(".gguf"):
            f = Path(where).expanduser() / name
            if not f.is_file():
                raise ValueError(f"{key}: no such GGUF file: {f}")
            with f.open("rb") as fh:
                if fh.read(4) != GGUF_MAGIC:
                    raise ValueError(f"{key}: {f} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return
    if not looks_local(cfg.path):
        check_hub_name(cfg, key)
        return
    p = Path(cfg.path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{key}: no such model directory: {cfg.path}")
    if not (p / "config.json").is_file():
        raise ValueError(f"{key}: {cfg.path} holds no config.json, so it is not a Hugging Face model directory "
                         "(a .gguf file goes in the path itself, or in model.gguf_file)")


def check_hub_name(cfg: ModelConfig, key: str) -> None:
    """A hub name must resolve (from the network or the local hub cache) to a model config."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # OSError, ValueError, connection errors: the message is what matters
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{key}: {cfg.path!r} is not a local directory, and loading it from the Hugging Face "
                         f"hub failed: {first}") from None


def model_dir(cfg: ModelConfig) -> str | None:
    """A directory or hub name `from_pretrained` can read: `cfg.path` itself, or for a
    GGUF checkpoint its converted copy in the cache (converted on first use)."""
    gguf = gguf_location(cfg)
    if gguf is None:
        return cfg.path
    return str(convert_gguf(*gguf))


def _gguf_key(where: str, name: str) -> str:
    f = Path(where).expanduser() / name
    if f.is_file():
        st = f.stat()
        ident = [str(f.resolve()), st.st_size, st.st_mtime_ns]
    else:  # a hub repo: its name and the file identify it
        ident = [where, name]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def convert_gguf(where: str, name: str) -> Path:
    """Dequantize a GGUF checkpoint to an fp32 Hugging Face directory (model, tokenizer,
    generation config), once: later calls return the cached directory.

    transformers reads GGUF (with the `gguf` package) but a model loaded that way refuses
    `save_pretrained`, so a plain model is rebuilt from its config and given the weights.
    The directory is written under a temporary name and renamed, so a crash never leaves
    half a model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = models_cache() / f"{Path(name).stem}-{_gguf_key(where, name)}"
    if (out / "config.json").is_file():
        return out
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # gguf raises many kinds; the message is what matters
        raise ValueError(f"cannot read GGUF checkpoint {Path(where) / name}: {type(e).__name__}: {e}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig.from_model_config(config)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out
