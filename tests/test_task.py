"""The built-in task: gold reward by hand, deterministic data, honest pairs, a usable tokenizer."""

import json
import random

import pytest

from rlhf.task import (ADJECTIVES, TaskConfig, best_response, gold_reward, make_pair_rows, make_sft_rows,
                       prompt_nouns, win_rate, write_task_data)

P = "Describe the apple and the river.\n"


@pytest.mark.parametrize("response,expected", [
    # (1.0 + 1.0) / 2
    ("lovely and wonderful.", 1.0),
    # (0.6 + -1.0) / 2
    ("calm and awful.", -0.2),
    # order matters: the first adjective is the apple's
    ("awful and calm.", -0.2),
    # river left without an adjective: (1.0 + MISSING -1.0) / 2
    ("lovely.", 0.0),
    # one adjective too many: (1.0 + 1.0 - 0.5) / 2
    ("lovely, lovely and lovely.", 0.75),
    # a noun in the apple's place: MISSING and EXTRA for it: (-1 - 0.5 + 1) / 2
    ("apple and lovely.", -0.25),
    # trailing junk after the full stop is one more item: (1 + 1 - 0.5) / 2
    ("lovely and lovely. banana", 0.75),
    # no full stop: still read
    ("lovely and lovely", 1.0),
    # garbage: one non-adjective item in the apple's place, river missing: (-1 - 0.5 - 1) / 2
    ("xq zz !!", -1.25),
    # empty: both missing
    ("", -1.0),
])
def test_gold_reward_hand_values(response, expected):
    assert gold_reward(P, response) == pytest.approx(expected)


def test_gold_reward_is_total_on_random_text():
    rng = random.Random(0)
    alphabet = "and, . apple river lovely xyz\n<|>"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        assert isinstance(gold_reward(P, text), float)
    assert gold_reward(P, best_response(P)) == 1.0


def test_files_are_deterministic(tmp_path):
    cfg = TaskConfig(num_sft=50, num_pairs=50, num_prompts=50, num_sft_eval=10, num_pairs_eval=10,
                     num_prompts_eval=10)
    a = write_task_data(tmp_path / "a", cfg)
    b = write_task_data(tmp_path / "b", cfg)
    c = write_task_data(tmp_path / "c", TaskConfig(**{**cfg.__dict__, "seed": 1}))
    for name in a:
        assert a[name].read_text() == b[name].read_text()
    assert a["sft_train"].read_text() != c["sft_train"].read_text()
    mtime = a["sft_train"].stat().st_mtime_ns
    write_task_data(tmp_path / "a", cfg)  # same config: files reused, not rewritten
    assert a["sft_train"].stat().st_mtime_ns == mtime


def test_pairs_are_ranked_by_gold_and_noise_swaps_them():
    rows = make_pair_rows(3000, random.Random(0), label_noise=0.0)
    assert all(r["gold_chosen"] > r["gold_rejected"] + 0.2 for r in rows)
    assert all(gold_reward(r["prompt"], r["chosen"]) == r["gold_chosen"] for r in rows[:200])
    noisy = make_pair_rows(3000, random.Random(0), label_noise=0.2)
    swapped = sum(r["gold_chosen"] < r["gold_rejected"] for r in noisy) / len(noisy)
    assert swapped == pytest.approx(0.2, abs=0.03)
    # corruptions are in there, so the reward model learns that they cost
    def items(text):
        return len(text.rstrip(".").replace(" and ", ", ").split(", "))

    assert any(items(r["rejected"]) != len(prompt_nouns(r["prompt"])) for r in rows)


def test_demonstrations_are_clean_and_middling():
    rows = make_sft_rows(2000, random.Random(0))
    golds = [gold_reward(r["prompt"], r["response"]) for r in rows]
    for r in rows[:300]:  # one known adjective per noun, nothing else
        words = r["response"].rstrip(".").replace(" and ", ", ").split(", ")
        assert len(words) == len(prompt_nouns(r["prompt"])) and all(w in ADJECTIVES for w in words)
    mean = sum(golds) / len(golds)
    assert abs(mean) < 0.1 and max(ADJECTIVES.values()) == 1.0  # room for PPO to climb to 1.0


def test_eval_prompts_are_held_out(tmp_path):
    files = write_task_data(tmp_path, TaskConfig(num_prompts=500, num_prompts_eval=100))
    sets = [{frozenset(prompt_nouns(json.loads(x)["prompt"])) for x in files[k].read_text().splitlines()}
            for k in ("prompts_train", "prompts_eval")]
    assert sets[1] and not (sets[0] & sets[1])


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.0, 0.5], [0.0, 1.0, 0.5]) == pytest.approx(0.5)
    assert win_rate([1.0, 1.0], [0.0, 1.0]) == pytest.approx(0.75)


def test_tokenizer(tokenizer, task_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task_dir / "tokenizer")
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token_id is not None
    row = json.loads((task_dir / "sft_train.jsonl").read_text().splitlines()[0])
    p, r = tok(row["prompt"])["input_ids"], tok(row["response"])["input_ids"]
    assert p + r == tok(row["prompt"] + row["response"])["input_ids"]  # the framework relies on it
    assert tok.decode(r) == row["response"]
    assert len(r) <= 20  # fits PPO's max_new_tokens with room
    # every task word is a single token
    assert all(len(tok(" " + w)["input_ids"]) == 1 for w in ADJECTIVES)
    assert tok.chat_template is None  # plain-text prompts: `rlhf chat` sends text as typed
