"""Row formats: detect them, check every field, and tokenize for each stage.

Formats (keys of a row):
- ``prompt``/``response`` and ``prompt``/``completion``: a demonstration;
- ``messages``: a chat, rendered with the tokenizer's chat template; assistant turns are trained;
- ``text``: plain text, every token trained;
- ``prompt``/``chosen``/``rejected``: a ranked pair with an explicit prompt (strings, or
  message lists in TRL's conversational layout); DeepSpeed-Chat's extra ``response`` is ignored;
- ``chosen``/``rejected``: a ranked pair whose prompt is the shared beginning (Anthropic
  HH: whole dialogues ``\\n\\nHuman: ...\\n\\nAssistant: ...``; or two message lists);
- ``prompt``: a prompt alone (PPO).

Pair rows also serve SFT (prompt + chosen) and every row with a prompt serves PPO,
so one dataset can feed all three stages with ``data.stage_split``.

Tokens: a prompt is tokenized with the tokenizer's special tokens (BOS, never twice),
a response without them and followed by EOS. Chat rows are rendered by the template,
which supplies its own special tokens; a reply ends at the template's end-of-turn
token (`<|im_end|>`, `<|eot_id|>`, ...): what the template writes after it (ChatML's
newline) is not part of the reply, so the reward model scores, and SFT trains, the
same last token at which generation stops.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rlhf.config import DataConfig
from rlhf.data.sources import DataError, Row

Messages = list[dict[str, str]]

STAGE_FORMATS = {
    "sft": ("prompt_response", "prompt_completion", "messages", "text", "prompt_chosen_rejected", "chosen_rejected"),
    "rm": ("prompt_chosen_rejected", "chosen_rejected"),
    "ppo": ("prompt", "prompt_response", "prompt_completion", "messages", "prompt_chosen_rejected",
            "chosen_rejected"),
}


def detect_format(row: Row, stage: str) -> str:
    keys = set(row.data)
    if "chosen" in keys or "rejected" in keys:
        fmt = "prompt_chosen_rejected" if "prompt" in keys else "chosen_rejected"
    elif "messages" in keys:
        fmt = "messages"
    elif "prompt" in keys and "response" in keys:
        fmt = "prompt_response"
    elif "prompt" in keys and "completion" in keys:
        fmt = "prompt_completion"
    elif "text" in keys:
        fmt = "text"
    elif "prompt" in keys:
        fmt = "prompt"
    else:
        raise DataError(f"{row.where}: cannot tell the row format from its keys {sorted(keys)}; expected "
                        "prompt/response, prompt/completion, messages, text, prompt/chosen/rejected, "
                        "chosen/rejected or prompt (rename columns with data.columns)")
    if fmt not in STAGE_FORMATS[stage]:
        raise DataError(f"{row.where}: format {fmt!r} cannot be used for the {stage} stage "
                        f"(it takes: {', '.join(STAGE_FORMATS[stage])})")
    return fmt


# --------------------------------------------------------------------------- field checks


def _text(row: Row, key: str) -> str:
    if key not in row.data or row.data[key] is None:
        raise DataError(f"{row.where}: field {key!r} is missing")
    v = row.data[key]
    if not isinstance(v, str):
        raise DataError(f"{row.where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _messages(row: Row, key: str, value: Any = None) -> Messages:
    v = row.data.get(key) if value is None else value
    if v is None:
        raise DataError(f"{row.where}: field {key!r} is missing")
    if not isinstance(v, list) or not v:
        raise DataError(f"{row.where}: field {key!r} must be a non-empty list of messages")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{row.where}: field {key!r}, message {i}: needs string `role` and `content`")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{row.where}: field {key!r}, message {i}: unknown role {m['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _text_or_messages(row: Row, key: str) -> str | Messages:
    v = row.data.get(key)
    return _messages(row, key) if isinstance(v, list) else _text(row, key)


def split_implicit_prompt(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of a pair whose prompt is implicit.

    The prompt ends at the last ``\\n\\nAssistant:`` inside the shared beginning (the
    Anthropic HH layout); without that marker, at the last whitespace of it.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    marker = "\n\nAssistant:"
    k = chosen.rfind(marker, 0, n)
    if k >= 0:
        cut = k + len(marker)
    else:
        cut = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n)) + 1
    if cut <= 0:
        raise DataError(f"{where}: `chosen` and `rejected` share no prompt; give an explicit `prompt` field")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _pair(row: Row, fmt: str) -> tuple[str | Messages, str | Messages, str | Messages]:
    chosen = _text_or_messages(row, "chosen")
    rejected = _text_or_messages(row, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(f"{row.where}: `chosen` and `rejected` must both be strings or both message lists")
    if fmt == "prompt_chosen_rejected":
        prompt = _text_or_messages(row, "prompt")
        if isinstance(prompt, list) != isinstance(chosen, list):
            raise DataError(f"{row.where}: `prompt` must be a string when `chosen` is, a message list when it is")
        return prompt, chosen, rejected
    if isinstance(chosen, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0 or chosen[k - 1]["role"] != "user":
            raise DataError(f"{row.where}: `chosen` and `rejected` must share the messages up to a user turn")
        return chosen[:k], chosen[k:], rejected[k:]
    return split_implicit_prompt(chosen, rejected, row.where)


# --------------------------------------------------------------------------- tokenization


@dataclass
class Report:
    """What happened to the rows of one split; logged at start."""

    rows: int = 0
    kept: int = 0
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        parts += [f"{n} {why}" for why, n in sorted(self.counts.items())]
        return ", ".join(parts)


class _Tok:
    """Tokenizer helpers shared by the stages."""

    def __init__(self, tokenizer):
        from rlhf.tokens import stop_token_ids

        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.stops = set(stop_token_ids(tokenizer))

    def prompt(self, text: str) -> list[int]:
        from rlhf.tokens import encode_prompt

        return encode_prompt(self.tok, text)

    def end_at_stop(self, ids: list[int]) -> list[int]:
        """`ids` up to and including the first stop token (all of them when there is none)."""
        for i, t in enumerate(ids):
            if t in self.stops:
                return ids[: i + 1]
        return ids

    def response(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.eos]

    def render(self, messages: Messages, generation_prompt: bool, where: str) -> str:
        if self.tok.chat_template is None:
            raise DataError(f"{where}: chat rows need a tokenizer with a chat template (set tokenizer.chat_template)")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def raw(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def chat_prompt_response(self, prompt: Messages, response: Messages, where: str) -> tuple[list[int], list[int]]:
        """Token ids of a chat prompt (ending with the generation prompt) and of its reply."""
        p = self.render(prompt, True, where)
        full = self.render(prompt + response, False, where)
        if not full.startswith(p):
            raise DataError(f"{where}: the chat template renders the prompt differently alone and in the "
                            "conversation, so the reply cannot be located")
        return self.raw(p), self.end_at_stop(self.raw(full[len(p):]))


def _each(rows: list[Row], fmt_of, skip_bad: bool, report: Report, fn) -> list[dict]:
    out = []
    for row in rows:
        report.rows += 1
        try:
            ex = fn(row, fmt_of(row))
        except DataError:
            if not skip_bad:
                raise
            report.counts["bad rows skipped"] += 1
            continue
        if isinstance(ex, str):  # a reason the row was dropped
            report.counts[ex] += 1
            continue
        report.kept += 1
        out.append(ex)
    return out


def _format_getter(cfg: DataConfig, stage: str):
    if cfg.format != "auto":
        if cfg.format not in STAGE_FORMATS[stage]:
            raise DataError(f"data.format: {cfg.format!r} is not a {stage} format "
                            f"(choose auto or one of: {', '.join(STAGE_FORMATS[stage])})")
        return lambda row: cfg.format
    return lambda row: detect_format(row, stage)


def tokenize_sft(rows: list[Row], tokenizer, cfg: DataConfig) -> tuple[list[dict], Report]:
    """Rows -> {input_ids, loss_mask}: the mask is 1 on the response tokens (and EOS) only."""
    t = _Tok(tokenizer)
    report = Report()

    def one(row: Row, fmt: str):
        if fmt == "text":
            ids = t.prompt(_text(row, "text")) + [t.eos]
            mask = [1] * len(ids)
            prompt_len = 1
        elif fmt == "messages":
            msgs = _messages(row, "messages")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{row.where}: field 'messages' has no assistant turn to train on")
            ids, mask = _chat_sft(t, msgs, row.where)
            prompt_len = mask.index(1) if 1 in mask else len(ids)
        else:
            if fmt in ("prompt_chosen_rejected", "chosen_rejected"):
                prompt, response, _ = _pair(row, fmt)
            else:
                prompt, response = _text(row, "prompt"), _text(row, "completion" if fmt == "prompt_completion"
                                                                 else "response")
            if isinstance(prompt, list):
                p, r = t.chat_prompt_response(prompt, response, row.where)
            else:
                p, r = t.prompt(prompt), t.response(response)
            ids, mask, prompt_len = p + r, [0] * len(p) + [1] * len(r), len(p)
        if prompt_len >= cfg.max_length:
            return "dropped: prompt alone longer than max_length"
        if len(ids) > cfg.max_length:
            if cfg.truncation == "drop":
                return "dropped: longer than max_length"
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            report.counts["truncated to max_length"] += 1
        mask[0] = 0  # the first token is never predicted (and packing must not predict it)
        return {"input_ids": ids, "loss_mask": mask}

    return _each(rows, _format_getter(cfg, "sft"), cfg.skip_bad_rows, report, one), report


def _chat_sft(t: _Tok, msgs: Messages, where: str) -> tuple[list[int], list[int]]:
    ids = t.raw(t.render(msgs, False, where))
    mask = [0] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(t.raw(t.render(msgs[:i], True, where)))
        end_ids = t.raw(t.render(msgs[: i + 1], False, where))
        if ids[: len(end_ids)] != end_ids:
            raise DataError(f"{where}: the chat template is not prefix-stable; cannot locate assistant turn {i}")
        end = start + len(t.end_at_stop(end_ids[start:]))
        for j in range(start, end):
            mask[j] = 1
    # What the template writes after the last trained token (a newline) teaches nothing.
    last = max((j for j, m in enumerate(mask) if m), default=len(ids) - 1)
    return ids[: last + 1], mask[: last + 1]


def tokenize_pairs(rows: list[Row], tokenizer, cfg: DataConfig) -> tuple[list[dict], Report]:
    """Rows -> {chosen_ids, rejected_ids, prompt_length, margin}: whole sequences (prompt +
    response + EOS) and the prompt's token count."""
    t = _Tok(tokenizer)
    report = Report()
    max_prompt = cfg.max_prompt_length

    def one(row: Row, fmt: str):
        prompt, chosen, rejected = _pair(row, fmt)
        if chosen == rejected:
            return "dropped: chosen identical to rejected"
        if isinstance(prompt, list):
            p, c = t.chat_prompt_response(prompt, chosen, row.where)
            _, r = t.chat_prompt_response(prompt, rejected, row.where)
        else:
            p, c, r = t.prompt(prompt), t.response(chosen), t.response(rejected)
        margin = row.data.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise DataError(f"{row.where}: field 'margin' must be a number, got {type(margin).__name__}")
        longest = max(len(c), len(r))
        if len(p) + longest > cfg.max_length or (max_prompt and len(p) > max_prompt):
            if cfg.truncation == "drop":
                return "dropped: longer than max_length"
            if cfg.truncation == "left":
                keep = min(cfg.max_length - longest, max_prompt or len(p))
                if keep < 1:
                    return "dropped: response alone longer than max_length"
                # keep the first token if it is BOS: models expect it
                bos = p[:1] if tokenizer.bos_token_id is not None and p[:1] == [tokenizer.bos_token_id] else []
                p = bos + p[len(p) - keep + len(bos):]
                report.counts["prompt cut from the left"] += 1
            else:  # right: cut the responses
                room = cfg.max_length - len(p)
                if room < 1:
                    return "dropped: prompt alone longer than max_length"
                c, r = c[:room], r[:room]
                report.counts["responses cut from the right"] += 1
                if c == r:
                    return "dropped: identical after truncation"
        # prompt_length: where the responses start (DPO scores response tokens only)
        return {"chosen_ids": p + c, "rejected_ids": p + r, "prompt_length": len(p), "margin": float(margin or 0.0)}

    return _each(rows, _format_getter(cfg, "rm"), cfg.skip_bad_rows, report, one), report


def tokenize_prompts(rows: list[Row], tokenizer, cfg: DataConfig) -> tuple[list[dict], Report]:
    """Rows -> {prompt_ids, prompt, fields, where}: the prompt text (rendered, for chat
    rows) is kept for task-specific evaluation such as the built-in task's gold reward;
    `fields` holds the row's other fields, `where` its file and line."""
    t = _Tok(tokenizer)
    report = Report()
    limit = cfg.max_prompt_length or cfg.max_length - 1

    def one(row: Row, fmt: str):
        if fmt == "prompt":
            prompt = _text_or_messages(row, "prompt")
        elif fmt == "messages":
            msgs = _messages(row, "messages")
            last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
            if last_user < 0:
                raise DataError(f"{row.where}: field 'messages' has no user turn to use as a prompt")
            prompt = msgs[: last_user + 1]
        elif fmt in ("prompt_chosen_rejected", "chosen_rejected"):
            prompt = _pair(row, fmt)[0]
        else:
            prompt = _text(row, "prompt")
        text = t.render(prompt, True, row.where) if isinstance(prompt, list) else prompt
        ids = t.raw(text) if isinstance(prompt, list) else t.prompt(text)
        if len(ids) > limit:
            if cfg.truncation != "left":
                return "dropped: prompt longer than max_prompt_length"
            ids = ids[len(ids) - limit:]
            report.counts["prompt cut from the left"] += 1
        # The row's other fields (e.g. a reference `answer`) go to reward functions and servers.
        fields = {k: v for k, v in row.data.items() if k not in _PROMPT_FIELDS}
        return {"prompt_ids": ids, "prompt": text, "fields": fields, "where": row.where}

    return _each(rows, _format_getter(cfg, "ppo"), cfg.skip_bad_rows, report, one), report


_PROMPT_FIELDS = ("prompt", "messages", "chosen", "rejected", "response", "completion")
