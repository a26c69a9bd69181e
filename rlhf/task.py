"""The built-in tasks, and the quickstart's: "describe things nicely", with a programmatic gold reward.

`TaskConfig.name` picks the task: `describe` (this module, the quickstart's: plain-text
prompts and a tokenizer trained offline, for tiny models) or `one_word`
(rlhf/task_one_word.py: chat prompts for a real instruct model, with its own tokenizer).
`materialize` writes the chosen task's files, `gold_function` returns its gold reward.

It lets the quickstart prove that RLHF works, with no download, on a laptop CPU:

    prompt:   Describe the apple, the river and the stone.\n
    response: lovely, calm and awful.

The response gives one adjective per noun of the prompt, in order. Each adjective has
a gold value in [-1, 1] (a few share the top value 1.0). The gold reward of a
response is the mean over the prompt's nouns of the value of the adjective in its
position (-1 for a noun left without one), minus 0.5 for every other item (an
adjective too many, or a word that is not an adjective).

- SFT demonstrations pick adjectives uniformly at random: the SFT policy writes
  well-formed answers of middling gold reward (about 0).
- Preference pairs come from the same distribution plus corruptions (an adjective
  dropped, one too many, a repeat, a non-adjective), ranked by gold reward,
  optionally with label noise. The reward model never sees a gold value.
- PPO can raise the gold reward to 1.0 by choosing the best adjectives; the gold
  reward is never shown to the policy except through the reward model.

(An earlier version had the answer restate each noun, "the apple is lovely": its tiny
reward models could not learn to check the nouns, and PPO learned to describe other
nouns than the ones asked for. Answers by position leave no such loophole.)

Eval prompts use noun sets that no training prompt uses.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

NOUNS = ["apple", "river", "stone", "garden", "house", "cloud", "forest", "bridge", "candle", "mountain",
         "window", "road", "ocean", "letter", "clock", "flower", "street", "kitten", "song", "city", "boat",
         "lamp", "field", "island"]

ADJECTIVES = {
    "lovely": 1.0, "wonderful": 1.0, "brilliant": 1.0, "bright": 0.8, "calm": 0.6, "pleasant": 0.5,
    "fine": 0.3, "plain": 0.1, "odd": -0.1, "dull": -0.3, "cold": -0.4, "messy": -0.5, "ugly": -0.7,
    "broken": -0.8, "awful": -1.0, "terrible": -1.0,
}

MISSING = -1.0  # value of a prompt noun the response gives no adjective
EXTRA = -0.5  # cost of any other item
EOS, PAD, USER, ASSISTANT = "<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>"
_SPLIT = re.compile(r", | and ")


@dataclass
class TaskConfig:
    name: Literal["describe", "one_word"] = "describe"
    """Which built-in task: `describe` (the quickstart's, rlhf/task.py: plain-text prompts,
    a tokenizer trained offline into dir/tokenizer) or `one_word` (rlhf/task_one_word.py:
    chat prompts for a real instruct model, which keeps its own tokenizer)."""
    dir: str = "runs/task"
    """Where the data files and the tokenizer are written (generated once, then reused)."""
    seed: int = 0
    """Seed of every draw; the same seed writes the same files."""
    num_sft: int = 4000
    """SFT demonstrations (training)."""
    num_sft_eval: int = 200
    """SFT demonstrations (held out)."""
    num_pairs: int = 4000
    """Preference pairs (training)."""
    num_pairs_eval: int = 400
    """Preference pairs (held out; labelled by the gold reward, never noisy)."""
    num_prompts: int = 2000
    """PPO prompts (training)."""
    num_prompts_eval: int = 200
    """PPO prompts (held out)."""
    label_noise: float = 0.0
    """Probability that a training pair's labels are swapped, as human labels are noisy."""
    min_gap: float = 0.25
    """Pairs whose gold rewards differ by less than this are not kept (a labeller could not tell)."""
    corruption: float = 0.3
    """Probability that a pair response is corrupted (an adjective dropped, added, repeated, or a noun)."""
    vocab_size: int = 512
    """`describe` only: tokenizer vocabulary (byte-level BPE), large enough that every task
    word is one token."""
    system_prompt: str | None = "Be brief."
    """`one_word` only: the system message of every prompt; null leaves it to the chat
    template, which may insert a default one (SmolLM2's costs about 20 tokens a row)."""

    def validate(self, v) -> None:
        for name in ("num_sft", "num_pairs", "num_prompts", "num_sft_eval", "num_pairs_eval", "num_prompts_eval"):
            v.check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        v.check(0 <= self.label_noise < 0.5, "label_noise", f"must be in [0, 0.5), got {self.label_noise}")
        v.check(0 <= self.min_gap < 2, "min_gap", f"must be in [0, 2), got {self.min_gap}")
        v.check(0 <= self.corruption <= 1, "corruption", f"must be in [0, 1], got {self.corruption}")
        v.check(self.vocab_size >= 300, "vocab_size", f"must be >= 300 (256 bytes + specials), got {self.vocab_size}")


# --------------------------------------------------------------------------- text


def make_prompt(nouns: list[str]) -> str:
    listed = ", ".join(f"the {n}" for n in nouns[:-1]) + f" and the {nouns[-1]}"
    return f"Describe {listed}.\n"


def make_response(adjectives: list[str]) -> str:
    body = adjectives[0] if len(adjectives) == 1 else ", ".join(adjectives[:-1]) + " and " + adjectives[-1]
    return body + "."


def prompt_nouns(prompt: str) -> list[str]:
    return re.findall(r"the ([a-z]+)", prompt)


def gold_reward(prompt: str, response: str) -> float:
    """The task's true reward of `response` to `prompt`; total on any text, never raises.

    Returns the mean over prompt nouns of the value of the adjective in the noun's
    position (MISSING where there is none or the item is not an adjective), with EXTRA
    added for each item beyond the nouns, each item that is not an adjective, and
    anything after the first full stop. An empty response scores MISSING.
    """
    nouns = prompt_nouns(prompt)
    if not nouns:
        return 0.0
    text, _, rest = response.strip().partition(".")  # the answer ends at its first full stop
    items = [x.strip() for x in _SPLIT.split(text)] if text.strip() else []
    total = EXTRA if rest.strip() else 0.0
    for i in range(max(len(nouns), len(items))):
        item = items[i] if i < len(items) else None
        known = item in ADJECTIVES
        if i < len(nouns):
            total += ADJECTIVES[item] if known else MISSING
        if item is not None and (i >= len(nouns) or not known):
            total += EXTRA
    return total / len(nouns)


def gold_rewards(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """`gold_reward` of each response, as a reward function (`reward.function:
    rlhf.task:gold_rewards`): the task's verifiable reward, with no reward model."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def best_response(prompt: str) -> str:
    """A response with the highest gold reward (1.0)."""
    return make_response(["lovely"] * len(prompt_nouns(prompt)))


def win_rate(gold_a: list[float], gold_b: list[float]) -> float:
    """Share of prompts on which a beats b, ties counting one half."""
    if len(gold_a) != len(gold_b) or not gold_a:
        raise ValueError("win_rate needs two equally long, non-empty lists")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold_a, gold_b))
    return wins / len(gold_a)


# --------------------------------------------------------------------------- sampling


def _is_eval(nouns: list[str]) -> bool:
    # One noun set in ten is held out for evaluation, whatever the seed (stable hash).
    return zlib.crc32(" ".join(sorted(nouns)).encode()) % 10 == 0


def sample_nouns(rng: random.Random, held_out: bool) -> list[str]:
    while True:
        nouns = rng.sample(NOUNS, rng.choice((2, 3)))
        if _is_eval(nouns) == held_out:
            return nouns


def sample_adjectives(rng: random.Random, nouns: list[str]) -> list[str]:
    return [rng.choice(list(ADJECTIVES)) for _ in nouns]


def corrupt(rng: random.Random, adjectives: list[str]) -> list[str]:
    """One of: drop an adjective, add one too many, repeat the last, put a noun in place
    of an adjective. The reward model must learn that these cost, or PPO would find them."""
    adjectives = list(adjectives)
    kind = rng.choice(("drop", "extra", "repeat", "noun"))
    if kind == "drop" and len(adjectives) > 1:
        adjectives.pop(rng.randrange(len(adjectives)))
    elif kind == "extra":
        adjectives.insert(rng.randrange(len(adjectives) + 1), rng.choice(list(ADJECTIVES)))
    elif kind == "noun":
        adjectives[rng.randrange(len(adjectives))] = rng.choice(NOUNS)
    else:
        adjectives.append(adjectives[-1])
    return adjectives


def make_sft_rows(n: int, rng: random.Random, held_out: bool = False) -> list[dict]:
    rows = []
    for _ in range(n):
        nouns = sample_nouns(rng, held_out)
        rows.append({"prompt": make_prompt(nouns), "response": make_response(sample_adjectives(rng, nouns))})
    return rows


def make_pair_rows(n: int, rng: random.Random, label_noise: float = 0.0, min_gap: float = 0.25,
                   corruption: float = 0.3, held_out: bool = False) -> list[dict]:
    """Ranked pairs: chosen has the higher gold reward (before label noise)."""
    rows = []
    while len(rows) < n:
        nouns = sample_nouns(rng, held_out)
        prompt = make_prompt(nouns)
        responses = []
        for _ in range(2):
            adjectives = sample_adjectives(rng, nouns)
            if rng.random() < corruption:
                adjectives = corrupt(rng, adjectives)
            responses.append(make_response(adjectives))
        gold = [gold_reward(prompt, r) for r in responses]
        if abs(gold[0] - gold[1]) < max(min_gap, 1e-9):
            continue
        hi, lo = (0, 1) if gold[0] > gold[1] else (1, 0)
        if rng.random() < label_noise:
            hi, lo = lo, hi
        rows.append({"prompt": prompt, "chosen": responses[hi], "rejected": responses[lo],
                     "gold_chosen": gold[hi], "gold_rejected": gold[lo]})
    return rows


def make_prompt_rows(n: int, rng: random.Random, held_out: bool = False) -> list[dict]:
    return [{"prompt": make_prompt(sample_nouns(rng, held_out))} for _ in range(n)]


# --------------------------------------------------------------------------- files


def task_rows(cfg: TaskConfig, rng: random.Random) -> dict[str, list[dict]]:
    """Every split of the `describe` task, drawn from `rng` in a fixed order."""
    return {
        "sft_train": make_sft_rows(cfg.num_sft, rng),
        "sft_eval": make_sft_rows(cfg.num_sft_eval, rng, held_out=True),
        "pairs_train": make_pair_rows(cfg.num_pairs, rng, cfg.label_noise, cfg.min_gap, cfg.corruption),
        "pairs_eval": make_pair_rows(cfg.num_pairs_eval, rng, 0.0, cfg.min_gap, cfg.corruption, held_out=True),
        "prompts_train": make_prompt_rows(cfg.num_prompts, rng),
        "prompts_eval": make_prompt_rows(cfg.num_prompts_eval, rng, held_out=True),
    }


def write_task_data(out_dir: str | Path, cfg: TaskConfig) -> dict[str, Path]:
    """Write the chosen task's JSONL files (once: a second call with the same config reuses them)."""
    out = Path(out_dir)
    files = {name: out / f"{name}.jsonl" for name in
             ("sft_train", "sft_eval", "pairs_train", "pairs_eval", "prompts_train", "prompts_eval")}
    stamp = out / "task.json"
    key = json.dumps({k: v for k, v in asdict(cfg).items() if k != "dir"}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == key and all(p.exists() for p in files.values()):
        return files
    rng = random.Random(cfg.seed)  # one stream, fixed order of draws: same seed, same files
    if cfg.name == "one_word":
        from rlhf import task_one_word

        contents = task_one_word.task_rows(cfg, rng)
    else:
        contents = task_rows(cfg, rng)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in contents.items():
        tmp = files[name].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(files[name])
    stamp.write_text(key)
    return files


def build_tokenizer(out_dir: str | Path, cfg: TaskConfig):
    """Train a byte-level BPE tokenizer on the task's words, offline; save it in HF format.

    Pad and EOS are different tokens. No chat template: the task's prompts are plain
    text. Returns the `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = Path(out_dir)
    stamp = out / "task_tokenizer.json"
    key = json.dumps({"vocab_size": cfg.vocab_size, "seed": cfg.seed, "v": 3})
    if stamp.exists() and stamp.read_text() == key:
        return AutoTokenizer.from_pretrained(out)
    rng = random.Random(cfg.seed)
    corpus = [make_prompt(sample_nouns(rng, rng.random() < 0.1)) + make_response(
        sample_adjectives(rng, NOUNS[:3])) for _ in range(2000)]
    corpus += [" ".join(NOUNS), " ".join(ADJECTIVES), "Describe the , and ."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=[EOS, PAD, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    # <|user|> and <|assistant|> are there so that chat data can use this vocabulary.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[USER, ASSISTANT])
    fast.save_pretrained(out)
    stamp.write_text(key)
    return fast


def materialize(cfg: TaskConfig) -> None:
    """Write the task's data (and the `describe` task's tokenizer) into cfg.dir (idempotent)."""
    write_task_data(cfg.dir, cfg)
    if cfg.name == "describe":
        build_tokenizer(Path(cfg.dir) / "tokenizer", cfg)


def gold_function(cfg: TaskConfig | str) -> Callable[[str, str], float]:
    """The gold reward `(prompt, response) -> float` of a task (a config or its name)."""
    if (cfg if isinstance(cfg, str) else cfg.name) == "one_word":
        from rlhf.task_one_word import gold_reward as one_word_gold

        return one_word_gold
    return gold_reward
