"""The built-in chat task for a real instruct model: "describe it in one word".

`task.name: one_word` (configs/smollm2.yaml). Prompts are chat messages, rendered by the
model's own chat template; the answer names the thing and gives it one adjective:

    system:    Be brief.
    user:      Describe the river in one word.
    assistant: The river is lovely.

The gold reward, which the policy never sees, is a hidden value per adjective of a
fixed list of fifteen, in five tiers that follow the adjectives' sentiment (1.0
wonderful, lovely, beautiful ... -1.0 ugly, awful, terrible), so that a pretrained body
tells them apart quickly. Every other answer scores BROKEN (-1.0, as low as the worst
adjective): another thing than the one asked about, a bare word, two adjectives, an
extra sentence, a word outside the list, an empty or cut-off answer. So the only way
to a higher gold reward is the intended one: choosing better adjectives in the right
form. Nothing is gained by length, repetition or silence.

- SFT demonstrations pick adjectives uniformly: the SFT policy answers in form with
  middling gold reward (about 0).
- Preference pairs come from the same distribution with broken answers mixed in (what
  PPO would try), ranked by gold reward, with label noise on the training pairs only.
- PPO must shift the choice of adjective; an untrained instruct model rarely answers in
  this form at all (it writes "Crisp." or a sentence), SFT teaches the form.

Held-out prompts (and held-out pairs and demonstrations) ask about things that no
training prompt names: one thing in five is held out, whatever the seed.
"""

from __future__ import annotations

import random
import re
import zlib

NOUNS = [
    "apple", "river", "stone", "garden", "house", "cloud", "forest", "bridge", "candle", "mountain", "window",
    "road", "ocean", "letter", "clock", "flower", "street", "kitten", "song", "city", "boat", "lamp", "field",
    "island", "castle", "library", "bicycle", "storm", "village", "meadow", "lake", "desert", "beach", "harbor",
    "tower", "valley", "cottage", "market", "kitchen", "painting", "poem", "story", "movie", "book", "chair",
    "table", "mirror", "door", "sky", "moon", "sun", "rain", "snow", "wind", "winter", "summer", "morning",
    "evening", "night", "dinner", "breakfast", "coffee", "bread", "cake", "soup", "lemon", "puppy", "horse",
    "bird", "owl", "fox", "wolf", "bear", "rabbit", "tiger", "train", "car", "bus", "ship", "park", "school",
    "office", "museum", "theater", "hotel", "room", "bed", "blanket", "sweater", "hat", "jacket", "umbrella",
    "guitar", "piano", "violin", "festival", "party", "journey", "sunset", "hill", "cave", "waterfall", "jungle",
    "farm", "fence", "path",
]

PHRASINGS = [
    "Describe the {noun} in one word.",
    "In one word, what is the {noun} like?",
    "What one word describes the {noun}?",
    "Give me one word for the {noun}.",
    "Sum up the {noun} in a single word.",
]

ADJECTIVES = {
    "wonderful": 1.0, "lovely": 1.0, "beautiful": 1.0,
    "pleasant": 0.5, "bright": 0.5, "charming": 0.5,
    "plain": 0.0, "ordinary": 0.0, "quiet": 0.0,
    "dull": -0.5, "messy": -0.5, "gloomy": -0.5,
    "ugly": -1.0, "awful": -1.0, "terrible": -1.0,
}

# Words outside the list, mostly the glowing ones SmolLM2 likes to write: an answer with
# one of them scores BROKEN. A reward model that has not learnt this from pairs scores
# them by their sentiment, and PPO drifts to them (a reward hack the gold reward shows).
OTHER_WORDS = ["great", "nice", "good", "fine", "amazing", "stunning", "excellent", "marvelous", "brilliant",
               "delightful", "vibrant", "magnificent", "gorgeous", "perfect", "fantastic", "splendid", "peaceful",
               "serene", "cozy", "majestic", "elegant", "warm", "bad", "sad", "boring", "dark", "strange",
               "miserable", "old", "big"]

BROKEN = -1.0  # gold reward of any answer not of the form "The <noun> is <listed adjective>."
# Kinds of broken answers, weighted: a word outside the list and another thing named are
# the ones a reward model needs the most examples of (the others break the form plainly).
CORRUPTIONS = {"other": 3, "noun": 2, "bare": 1, "two": 1, "extra": 1, "cut": 1}
_PHRASING_RES = [re.compile(re.escape(p).replace(re.escape("{noun}"), "([a-z]+)")) for p in PHRASINGS]


# --------------------------------------------------------------------------- text


def make_prompt(noun: str, phrasing: int, system: str | None) -> list[dict[str, str]]:
    """The chat messages of a prompt (a system message when `system` is not None)."""
    user = {"role": "user", "content": PHRASINGS[phrasing].format(noun=noun)}
    return [{"role": "system", "content": system}, user] if system is not None else [user]


def make_answer(noun: str, adjective: str) -> str:
    return f"The {noun} is {adjective}."


def prompt_noun(prompt: str | list[dict[str, str]]) -> str | None:
    """The thing a prompt asks about: from its messages, or from the prompt as the chat
    template rendered it (the last phrasing found). None for a prompt of another task."""
    text = "\n".join(m["content"] for m in prompt if m["role"] == "user") if isinstance(prompt, list) else prompt
    found = [(m.start(), m.group(1)) for r in _PHRASING_RES for m in r.finditer(text)]
    return max(found)[1] if found else None


def gold_reward(prompt: str | list[dict[str, str]], response: str) -> float:
    """The task's true reward of `response` to `prompt`; total on any text, never raises.

    The hidden value of the adjective when the response is exactly "The <noun> is
    <adjective>." (surrounding whitespace aside) with the noun the prompt asks about and
    an adjective of the list; BROKEN otherwise. 0.0 for a prompt that is not the task's.
    """
    noun = prompt_noun(prompt)
    if noun is None:
        return 0.0
    m = re.fullmatch(r"The ([a-z]+) is ([a-z]+)\.", response.strip())
    if m is None or m.group(1) != noun or m.group(2) not in ADJECTIVES:
        return BROKEN
    return ADJECTIVES[m.group(2)]


def gold_rewards(prompts: list, responses: list[str], **fields) -> list[float]:
    """`gold_reward` of each response, as a reward function (`reward.function:
    rlhf.task_one_word:gold_rewards`): the task's verifiable reward, with no reward model."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def best_response(prompt: str | list[dict[str, str]]) -> str:
    """A response with the highest gold reward (1.0)."""
    return make_answer(prompt_noun(prompt) or "thing", "wonderful")


# --------------------------------------------------------------------------- sampling


def is_held_out(noun: str) -> bool:
    # One thing in five is held out for evaluation, whatever the seed (stable hash).
    return zlib.crc32(noun.encode()) % 5 == 0


def nouns_of(held_out: bool) -> list[str]:
    return [n for n in NOUNS if is_held_out(n) == held_out]


def sample_prompt(rng: random.Random, held_out: bool) -> tuple[str, int]:
    return rng.choice(nouns_of(held_out)), rng.randrange(len(PHRASINGS))


def corrupt(rng: random.Random, noun: str, adjective: str) -> str:
    """A broken answer of one of the kinds PPO would try: another thing named, a bare
    word, two adjectives, an extra sentence, a word outside the list, an empty or cut
    answer. Each scores BROKEN; the reward model must learn that they cost."""
    kind = rng.choices(list(CORRUPTIONS), weights=list(CORRUPTIONS.values()))[0]
    if kind == "noun":
        return make_answer(rng.choice([n for n in NOUNS if n != noun]), adjective)
    if kind == "bare":
        return adjective.capitalize() + "."
    if kind == "two":
        return f"The {noun} is {adjective} and {rng.choice(list(ADJECTIVES))}."
    if kind == "extra":
        return make_answer(noun, adjective) + rng.choice([" I hope this helps!", f" It is {adjective}."])
    if kind == "other":
        return make_answer(noun, rng.choice(OTHER_WORDS))
    return rng.choice(["", f"The {noun} is"])


def make_sft_rows(n: int, rng: random.Random, system: str | None, held_out: bool = False) -> list[dict]:
    rows = []
    for _ in range(n):
        noun, phrasing = sample_prompt(rng, held_out)
        answer = make_answer(noun, rng.choice(list(ADJECTIVES)))
        rows.append({"messages": make_prompt(noun, phrasing, system) + [{"role": "assistant", "content": answer}]})
    return rows


def make_pair_rows(n: int, rng: random.Random, system: str | None, label_noise: float = 0.0,
                   min_gap: float = 0.5, corruption: float = 0.3, held_out: bool = False) -> list[dict]:
    """Ranked pairs in TRL's conversational layout: chosen has the higher gold reward
    (before label noise); pairs closer than `min_gap` are not kept."""
    rows = []
    while len(rows) < n:
        noun, phrasing = sample_prompt(rng, held_out)
        prompt = make_prompt(noun, phrasing, system)
        answers = []
        for _ in range(2):
            adjective = rng.choice(list(ADJECTIVES))
            answers.append(corrupt(rng, noun, adjective) if rng.random() < corruption else make_answer(noun, adjective))
        gold = [gold_reward(prompt, a) for a in answers]
        if abs(gold[0] - gold[1]) < max(min_gap, 1e-9):
            continue
        hi, lo = (0, 1) if gold[0] > gold[1] else (1, 0)
        if rng.random() < label_noise:
            hi, lo = lo, hi
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answers[hi]}],
                     "rejected": [{"role": "assistant", "content": answers[lo]}],
                     "gold_chosen": gold[hi], "gold_rejected": gold[lo]})
    return rows


def make_prompt_rows(n: int, rng: random.Random, system: str | None, held_out: bool = False) -> list[dict]:
    """PPO prompts. Held out: every (thing, phrasing) combination once, in a random order,
    before any repeats, so that n up to their number gives n distinct prompts."""
    if not held_out:
        return [{"prompt": make_prompt(*sample_prompt(rng, False), system)} for _ in range(n)]
    combos = [(noun, p) for noun in nouns_of(True) for p in range(len(PHRASINGS))]
    rng.shuffle(combos)
    return [{"prompt": make_prompt(*combos[i % len(combos)], system)} for i in range(n)]


def task_rows(cfg, rng: random.Random) -> dict[str, list[dict]]:
    """Every split of the task for a `TaskConfig`, drawn from `rng` in a fixed order."""
    s = cfg.system_prompt
    return {
        "sft_train": make_sft_rows(cfg.num_sft, rng, s),
        "sft_eval": make_sft_rows(cfg.num_sft_eval, rng, s, held_out=True),
        "pairs_train": make_pair_rows(cfg.num_pairs, rng, s, cfg.label_noise, cfg.min_gap, cfg.corruption),
        "pairs_eval": make_pair_rows(cfg.num_pairs_eval, rng, s, 0.0, cfg.min_gap, cfg.corruption, held_out=True),
        "prompts_train": make_prompt_rows(cfg.num_prompts, rng, s),
        "prompts_eval": make_prompt_rows(cfg.num_prompts_eval, rng, s, held_out=True),
    }
