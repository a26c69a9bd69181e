"""Tokenizers as they come from the hub, made safe for RLHF: a pad token distinct from
every end token, the full set of tokens that end a response, and prompts encoded
without a doubled BOS.

Real checkpoints disagree on these conventions. SmolLM2 and Llama-3 pad with their
EOS (or have no pad); Llama-3-Instruct ends a turn with `<|eot_id|>` while its
tokenizer's EOS may be `<|end_of_text|>`, and lists three ids in
`generation_config.eos_token_id`; ChatML templates end a turn with `<|im_end|>` and
then a newline. Masks here come from positions, so the one thing we need from a
tokenizer is which ids end a response (`stop_token_ids`) and a pad id that is none
of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Tokens that checkpoints ship for padding but do not use as padding by default
# (Llama-3.1's reserved pad token among them). Reusing one avoids resizing the embeddings.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|endoftext|>")


@dataclass
class PadChoice:
    """How the pad token was chosen, printed at start so nothing happens silently."""

    token: str
    id: int
    how: str  # "kept" | "reused" | "added"

    def describe(self) -> str:
        what = {"kept": "the tokenizer's own", "reused": "an existing unused token, reused",
                "added": "added to the vocabulary"}[self.how]
        return f"pad token {self.token!r} (id {self.id}): {what}"


def choose_pad(tokenizer, requested: str, stop_ids: list[int]) -> PadChoice:
    """Give `tokenizer` a pad token that is none of `stop_ids` (nor BOS), in place.

    Args:
        requested: `auto`, or a token string. `auto` keeps the tokenizer's pad when it is
            not an end token; otherwise reuses the first of PAD_CANDIDATES (then the unk
            token) that the vocabulary has and that is not an end or BOS token; otherwise
            adds `<|pad|>`. A token string is reused when the vocabulary has it, added
            when it does not.
    """
    forbidden = set(stop_ids) | ({tokenizer.bos_token_id} if tokenizer.bos_token_id is not None else set())
    vocab = tokenizer.get_vocab()
    if requested == "auto":
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in forbidden:
            return PadChoice(tokenizer.pad_token, tokenizer.pad_token_id, "kept")
        candidates = [*PAD_CANDIDATES, tokenizer.unk_token]
        token = next((t for t in candidates if t is not None and t in vocab and vocab[t] not in forbidden), None)
        if token is None:
            token = "<|pad|>"
    else:
        token = requested
        if token in vocab and vocab[token] in forbidden:
            raise ValueError(f"tokenizer.pad_token: {token!r} (id {vocab[token]}) ends responses or is BOS here; "
                             "pad must differ from every end token (masks come from positions)")
    how = "reused" if token in vocab else "added"
    if tokenizer.pad_token != token:
        tokenizer.add_special_tokens({"pad_token": token})
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in forbidden:
        raise ValueError(f"tokenizer.pad_token: could not set a pad token distinct from the end tokens {stop_ids}")
    return PadChoice(token, tokenizer.pad_token_id, how)


def end_of_turn_token(tokenizer) -> int | None:
    """The special token a chat template writes right after an assistant message
    (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`), or None without a template
    or when what follows the message is not one special token."""
    if tokenizer.chat_template is None:
        return None
    sentinel = "Sentinel4242"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
    except Exception:  # a template that refuses this conversation shape tells us nothing
        return None
    if not isinstance(text, str) or sentinel not in text:
        return None
    after = text.split(sentinel, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None


def generation_config_eos(model_dir: str | Path | None) -> list[int]:
    """`eos_token_id` of a model directory's generation_config.json (an int or a list)."""
    if model_dir is None:
        return []
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def stop_token_ids(tokenizer, model_dir: str | Path | None = None, extra: list[str] | None = None) -> list[int]:
    """Every token id that ends a response, sorted: the tokenizer's EOS, the chat
    template's end-of-turn token, the model's generation_config EOS ids and the
    `extra` tokens (config `tokenizer.stop_tokens`). Rollouts stop at the first of
    them; action masks and the reward position end there."""
    ids = {tokenizer.eos_token_id, end_of_turn_token(tokenizer), *generation_config_eos(model_dir)}
    vocab = tokenizer.get_vocab()
    for tok in extra or []:
        if tok not in vocab:
            raise ValueError(f"tokenizer.stop_tokens: {tok!r} is not in the tokenizer's vocabulary")
        ids.add(vocab[tok])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and its chat template no end-of-turn token: responses "
                         "could never end (set tokenizer.stop_tokens)")
    return sorted(ids)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's special tokens (its BOS), and one BOS
    only when the text already starts with it (a rendered chat template does)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids
