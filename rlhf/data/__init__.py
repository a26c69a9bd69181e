"""Data for every stage: sources -> rows -> checked, tokenized examples, cached on disk.

`build_stage_data` is what a trainer calls. It reads the configured sources, mixes
and splits them, checks and tokenizes every row, and caches the result keyed by the
inputs (file contents' size and mtime, tokenizer, data config), so the next run and
the other ranks of a node read the cache instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.config import DataConfig
from rlhf.data.batching import pack
from rlhf.data.formats import tokenize_pairs, tokenize_prompts, tokenize_sft
from rlhf.data.sources import DataError, load_rows

__all__ = ["DataError", "StageData", "build_stage_data"]

# By the data kind of a stage (rlhf.stages: sft, pairs, prompts).
_TOKENIZE = {"sft": tokenize_sft, "pairs": tokenize_pairs, "prompts": tokenize_prompts}
_CACHE_VERSION = 3  # bump when the tokenized layout changes


@dataclass
class StageData:
    train: list[dict]
    eval: list[dict]
    summary: str
    """One line per split: rows kept, dropped, truncated, skipped."""


def build_stage_data(stage: str, cfg: DataConfig, tokenizer, use_cache: bool = True) -> StageData:
    """Checked, tokenized train and eval examples of `stage` (a name of rlhf.stages).

    Raises DataError naming the file, line and field of the first bad row (unless
    `cfg.skip_bad_rows`), or when no usable row is left.
    """
    path = _cache_path(stage, cfg, tokenizer) if use_cache else None
    if path is not None and path.exists():
        with path.open("rb") as f:
            return pickle.load(f)
    from rlhf.stages import REGISTRY  # here: the registry imports the configs, which import the task

    kind = REGISTRY[stage].data
    train_rows, eval_rows = load_rows(cfg, REGISTRY[stage].split)
    tokenize = _TOKENIZE[kind]
    train, train_report = tokenize(train_rows, tokenizer, cfg)
    if not train:
        raise DataError(f"no usable training rows ({train_report.summary()}); "
                        f"check data.max_length={cfg.max_length} and the data")
    evals, eval_report = tokenize(eval_rows, tokenizer, cfg) if eval_rows else ([], None)
    if stage == "sft" and cfg.packing:
        train, evals = pack(train, cfg.max_length), pack(evals, cfg.max_length)
    summary = f"train: {train_report.summary()}"
    if eval_report is not None:
        summary += f"; eval: {eval_report.summary()}"
    data = StageData(train, evals, summary)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    return data


def _cache_path(stage: str, cfg: DataConfig, tokenizer) -> Path:
    root = Path(cfg.cache_dir or os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")
    sources = list(cfg.all_sources()) + ([cfg.eval] if cfg.eval is not None else [])
    files = []
    for s in sources:
        if s.path is not None:
            st = Path(s.path).stat()
            files.append([str(Path(s.path).resolve()), st.st_size, st.st_mtime_ns])
    key = {
        "v": _CACHE_VERSION,
        "stage": stage,
        "data": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "files": files,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return root / "data" / f"{stage}-{digest}.pkl"


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.all_special_tokens,
                        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256((body + extra).encode()).hexdigest()
