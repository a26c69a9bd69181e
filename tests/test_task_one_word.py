"""The chat task `one_word`: gold reward by hand, deterministic data, honest pairs,
held-out prompts, and rows that SmolLM2's own chat template renders within the
lengths configs/smollm2.yaml allows."""

import json
import random
from pathlib import Path

import pytest

from rlhf import task_one_word as t
from rlhf.task import TaskConfig, gold_function, gold_reward as describe_gold, materialize, write_task_data

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the river in one word."}]
# The same prompt as SmolLM2's template renders it (the gold reads rendered prompts in PPO).
RENDERED = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDescribe the river in one word.<|im_end|>\n"
            "<|im_start|>assistant\n")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml"


@pytest.mark.parametrize("response,expected", [
    ("The river is wonderful.", 1.0),  # top tier
    ("The river is charming.", 0.5),
    ("The river is quiet.", 0.0),
    ("The river is gloomy.", -0.5),
    ("The river is terrible.", -1.0),  # bottom tier
    ("  The river is lovely.\n", 1.0),  # surrounding whitespace does not matter
    ("The lake is lovely.", -1.0),  # another thing than the one asked about
    ("Lovely.", -1.0),  # a bare word
    ("The river is lovely and bright.", -1.0),  # two adjectives
    ("The river is lovely. It is lovely.", -1.0),  # an extra sentence (repetition)
    ("The river is great.", -1.0),  # a word outside the list, however positive
    ("The river is Lovely.", -1.0),  # the form is exact
    ("The river is lovely", -1.0),  # no full stop
    ("", -1.0),  # silence
    ("The river is", -1.0),  # cut off
])
def test_gold_reward_hand_values(response, expected):
    assert t.gold_reward(USER, response) == expected
    assert t.gold_reward(RENDERED, response) == expected


def test_gold_reward_reads_the_asked_thing_and_is_total():
    # the system prompt or an earlier turn may mention other things: the last phrasing counts
    convo = [{"role": "user", "content": "Describe the lake in one word."},
             {"role": "assistant", "content": "The lake is calm."},
             {"role": "user", "content": "In one word, what is the owl like?"}]
    assert t.prompt_noun(convo) == "owl"
    assert t.gold_reward(convo, "The owl is bright.") == 0.5
    assert t.gold_reward("Tell me a joke.", "The owl is bright.") == 0.0  # not this task's prompt
    rng = random.Random(0)
    alphabet = "The river is lovely. and\n<|>"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        assert isinstance(t.gold_reward(RENDERED, text), float)
    for phrasing in range(len(t.PHRASINGS)):
        prompt = t.make_prompt("fox", phrasing, None)
        assert t.gold_reward(prompt, t.best_response(prompt)) == max(t.ADJECTIVES.values())


def test_every_corruption_is_broken():
    rng = random.Random(1)
    for _ in range(300):
        noun, adjective = rng.choice(t.NOUNS), rng.choice(list(t.ADJECTIVES))
        answer = t.corrupt(rng, noun, adjective)
        assert t.gold_reward(t.make_prompt(noun, 0, None), answer) == t.BROKEN, answer


def test_task_selection_is_explicit():
    assert gold_function(TaskConfig()) is describe_gold
    assert gold_function(TaskConfig(name="one_word")) is t.gold_reward
    assert gold_function("one_word") is t.gold_reward


def test_gold_rewards_as_a_reward_function():
    from rlhf.config import RewardConfig
    from rlhf.rewards import RewardSources

    sources = RewardSources(RewardConfig(function="rlhf.task_one_word:gold_rewards"))
    rows = [{"prompt": RENDERED, "fields": {}, "where": "x.jsonl:1"}] * 3
    # in form with a top adjective; a word outside the list; a bare word
    scores = sources.score(None, [RENDERED] * 3, ["The river is lovely.", "The river is nice.", "Lovely."], rows)
    assert scores.tolist() == [1.0, t.BROKEN, t.BROKEN]


def small(**kw) -> TaskConfig:
    sizes = dict(num_sft=60, num_sft_eval=10, num_pairs=60, num_pairs_eval=20, num_prompts=60, num_prompts_eval=100)
    return TaskConfig(**{"name": "one_word", "label_noise": 0.1, "min_gap": 0.5, **sizes, **kw})


def test_files_are_deterministic_in_the_seed(tmp_path):
    a = write_task_data(tmp_path / "a", small())
    b = write_task_data(tmp_path / "b", small())
    c = write_task_data(tmp_path / "c", small(seed=1))
    for name in a:
        assert a[name].read_text() == b[name].read_text()
        assert a[name].read_text() != c[name].read_text()
    materialize(small(dir=str(tmp_path / "m")))  # no tokenizer: the model keeps its own
    assert not (tmp_path / "m" / "tokenizer").exists() and (tmp_path / "m" / "sft_train.jsonl").is_file()


def test_held_out_prompts_are_distinct_and_unseen(tmp_path):
    files = write_task_data(tmp_path, small(num_prompts=500))
    rows = {k: [json.loads(x) for x in files[k].read_text().splitlines()] for k in files}
    train = {t.prompt_noun(r["prompt"]) for r in rows["prompts_train"]}
    held = [r["prompt"][-1]["content"] for r in rows["prompts_eval"]]
    assert len(set(held)) == 100  # every held-out (thing, phrasing) once
    assert not train & {t.prompt_noun(r["prompt"]) for r in rows["prompts_eval"]}
    assert not train & {t.prompt_noun(r["prompt"]) for r in rows["pairs_eval"]}
    assert not train & {t.prompt_noun(r["messages"][:-1]) for r in rows["sft_eval"]}


def test_pairs_are_ranked_by_gold_and_noise_swaps_only_training_pairs():
    rows = t.make_pair_rows(3000, random.Random(0), "Be brief.", label_noise=0.0)
    for r in rows[:300]:
        assert r["gold_chosen"] >= r["gold_rejected"] + 0.5
        assert t.gold_reward(r["prompt"], r["chosen"][0]["content"]) == r["gold_chosen"]
    assert sum(r["gold_rejected"] == t.BROKEN for r in rows) > 300  # broken answers are in there
    noisy = t.make_pair_rows(3000, random.Random(0), "Be brief.", label_noise=0.2)
    swapped = sum(r["gold_chosen"] < r["gold_rejected"] for r in noisy) / len(noisy)
    assert swapped == pytest.approx(0.2, abs=0.03)


def test_demonstrations_are_in_form_and_middling():
    rows = t.make_sft_rows(3000, random.Random(0), None)
    golds = [t.gold_reward(r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]
    for r in rows[:300]:  # the form, the asked thing, a listed adjective
        noun = t.prompt_noun(r["messages"][:-1])
        assert r["messages"][-1]["content"] in {t.make_answer(noun, a) for a in t.ADJECTIVES}
    counts = {a: sum(r["messages"][-1]["content"] == t.make_answer(t.prompt_noun(r["messages"]), a) for r in rows)
              for a in t.ADJECTIVES}
    assert min(counts.values()) > 3000 / len(t.ADJECTIVES) * 0.7  # adjectives drawn uniformly
    assert abs(sum(golds) / len(golds)) < 0.05  # middling: PPO has room to climb to 1.0


def test_rows_render_with_smollm2_template_within_the_config_lengths(tmp_path, smollm2_dir):
    """SmolLM2's own template: the reply is trained up to <|im_end|>, the PPO prompt ends
    with the generation prompt, and nothing is cut or dropped at the lengths of
    configs/smollm2.yaml."""
    from rlhf.config import RMConfig, PPOConfig, SFTConfig, TokenizerConfig, load_stage_config
    from rlhf.data.formats import tokenize_pairs, tokenize_prompts, tokenize_sft
    from rlhf.data.sources import load_rows
    from rlhf.models import load_tokenizer

    files = write_task_data(tmp_path, small())
    tok = load_tokenizer(TokenizerConfig(path=str(smollm2_dir)))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    overrides = [f"output_dir={tmp_path / 'out'}", f"task.dir={tmp_path}"]
    sft, rm, ppo = (load_stage_config(cls, CONFIG, overrides).data for cls in (SFTConfig, RMConfig, PPOConfig))

    sft_rows, _ = load_rows(sft.__class__(path=str(files["sft_train"])), 2)
    examples, report = tokenize_sft(sft_rows, tok, sft)
    assert report.kept == report.rows and not report.counts
    ex = examples[0]
    reply = [i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
    assert reply[-1] == im_end
    assert tok.decode(reply[:-1]) == sft_rows[0].data["messages"][-1]["content"]

    pair_rows, _ = load_rows(rm.__class__(path=str(files["pairs_train"])), 2)
    pairs, report = tokenize_pairs(pair_rows, tok, rm)
    assert report.kept == report.rows and not report.counts
    assert pairs[0]["chosen_ids"][-1] == im_end and pairs[0]["rejected_ids"][-1] == im_end

    prompt_rows, _ = load_rows(ppo.__class__(path=str(files["prompts_eval"])), 2)
    prompts, report = tokenize_prompts(prompt_rows, tok, ppo)
    assert report.kept == report.rows == 100
    assert prompts[0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert prompts[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert t.prompt_noun(prompts[0]["prompt"]) == t.prompt_noun(prompt_rows[0].data["prompt"])
