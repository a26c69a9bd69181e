"""Row formats, masks, truncation, splits, mixtures, caching and bad input: no model needed."""

import json

import pytest
import torch

from rlhf.config import DataConfig, SourceConfig
from rlhf.data import DataError, build_stage_data
from rlhf.data.batching import (StepSampler, cat_padded, collate_pairs_shared_prefix, collate_prompts, collate_sft,
                                 pack)
from rlhf.data.formats import split_implicit_prompt, tokenize_pairs, tokenize_prompts, tokenize_sft
from rlhf.data.sources import Row, load_rows


def rows(*dicts):
    return [Row(d, f"test.jsonl:{i + 1}") for i, d in enumerate(dicts)]


def jsonl(tmp_path, items, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(x) + "\n" for x in items))
    return p


def enc(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


# --------------------------------------------------------------------------- SFT formats


@pytest.mark.parametrize("key", ["response", "completion"])
def test_prompt_response_mask_covers_response_and_eos(tokenizer, key):
    ex, rep = tokenize_sft(rows({"prompt": "Describe the cat.\n", key: "the cat is calm."}), tokenizer, DataConfig())
    p, r = enc(tokenizer, "Describe the cat.\n", True), enc(tokenizer, "the cat is calm.")
    assert ex[0]["input_ids"] == p + r + [tokenizer.eos_token_id]
    assert ex[0]["loss_mask"] == [0] * len(p) + [1] * (len(r) + 1)
    assert rep.kept == 1


def test_messages_train_assistant_turns_only(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat is calm."},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "the dog is bad."}]
    ex, _ = tokenize_sft(rows({"messages": msgs}), tokenizer, DataConfig())
    ids, mask = ex[0]["input_ids"], ex[0]["loss_mask"]
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    # both replies and their end-of-turn tokens, nothing from the user turns
    assert "the cat is calm." in trained and "the dog is bad." in trained
    assert "hi" not in trained and "more" not in trained
    assert sum(1 for t, m in zip(ids, mask) if m and t == tokenizer.eos_token_id) == 2


def test_text_trains_every_token_but_the_first(tokenizer):
    ex, _ = tokenize_sft(rows({"text": "the cat is calm."}), tokenizer, DataConfig())
    assert ex[0]["loss_mask"][0] == 0 and all(ex[0]["loss_mask"][1:])
    assert ex[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_sft_takes_chosen_of_a_pair(tokenizer):
    ex, _ = tokenize_sft(rows({"prompt": "P\n", "chosen": "the cat is calm.", "rejected": "no"}), tokenizer,
                         DataConfig())
    assert tokenizer.decode([t for t, m in zip(ex[0]["input_ids"], ex[0]["loss_mask"]) if m],
                            skip_special_tokens=True) == "the cat is calm."


def test_sft_truncation_and_drops(tokenizer):
    long = {"prompt": "Describe the cat.\n", "response": " ".join(["the cat is calm."] * 20)}
    too_long_prompt = {"prompt": " ".join(["the cat"] * 40), "response": "x"}
    cfg = DataConfig(max_length=16)
    ex, rep = tokenize_sft(rows(long, too_long_prompt), tokenizer, cfg)
    assert len(ex) == 1 and len(ex[0]["input_ids"]) == 16
    assert rep.counts["dropped: prompt alone longer than max_length"] == 1
    assert rep.counts["truncated to max_length"] == 1
    ex, rep = tokenize_sft(rows(long), tokenizer, DataConfig(max_length=16, truncation="drop"))
    assert ex == [] and rep.counts["dropped: longer than max_length"] == 1


# --------------------------------------------------------------------------- pairs


def test_explicit_pair(tokenizer):
    ex, _ = tokenize_pairs(rows({"prompt": "P\n", "chosen": "good", "rejected": "bad", "margin": 1.5}),
                           tokenizer, DataConfig())
    p = enc(tokenizer, "P\n", True)
    assert ex[0]["chosen_ids"] == p + enc(tokenizer, "good") + [tokenizer.eos_token_id]
    assert ex[0]["rejected_ids"] == p + enc(tokenizer, "bad") + [tokenizer.eos_token_id]
    assert ex[0]["margin"] == 1.5


def test_hh_style_implicit_prompt():
    chosen = "\n\nHuman: What is a cat?\n\nAssistant: A small animal."
    rejected = "\n\nHuman: What is a cat?\n\nAssistant: A car."
    prompt, c, r = split_implicit_prompt(chosen, rejected, "x")
    assert prompt == "\n\nHuman: What is a cat?\n\nAssistant:"
    assert (c, r) == (" A small animal.", " A car.")
    # multi-turn: the prompt ends at the last shared Assistant marker
    chosen2 = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes"
    rejected2 = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no"
    assert split_implicit_prompt(chosen2, rejected2, "x")[0] == chosen2[: -len(" yes")]


def test_conversational_pairs_implicit_and_explicit(tokenizer):
    user = [{"role": "user", "content": "hi"}]
    good, bad = [{"role": "assistant", "content": "the cat is calm."}], [{"role": "assistant", "content": "no"}]
    a, _ = tokenize_pairs(rows({"chosen": user + good, "rejected": user + bad}), tokenizer, DataConfig())
    b, _ = tokenize_pairs(rows({"prompt": user, "chosen": good, "rejected": bad}), tokenizer, DataConfig())
    assert a == b
    assert tokenizer.decode(a[0]["chosen_ids"]).endswith("the cat is calm.<|endoftext|>")


def test_identical_pairs_are_dropped_and_counted(tokenizer):
    ex, rep = tokenize_pairs(rows({"prompt": "P", "chosen": "same", "rejected": "same"},
                                  {"prompt": "P", "chosen": "a", "rejected": "b"}), tokenizer, DataConfig())
    assert len(ex) == 1 and rep.counts["dropped: chosen identical to rejected"] == 1


def test_pair_left_truncation_keeps_the_end_of_the_prompt(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(40))
    ex, rep = tokenize_pairs(rows({"prompt": prompt, "chosen": "a", "rejected": "b"}), tokenizer,
                             DataConfig(max_length=12, truncation="left"))
    assert len(ex[0]["chosen_ids"]) <= 12
    assert tokenizer.decode(ex[0]["chosen_ids"]).startswith(tokenizer.decode(enc(tokenizer, prompt)[-10:])[:3])
    assert rep.counts["prompt cut from the left"] == 1
    ex, rep = tokenize_pairs(rows({"prompt": prompt, "chosen": "a", "rejected": "b"}), tokenizer,
                             DataConfig(max_length=12, truncation="drop"))
    assert ex == []


# --------------------------------------------------------------------------- prompts


def test_prompts_from_every_format(tokenizer):
    user = [{"role": "user", "content": "hi"}]
    got, _ = tokenize_prompts(rows(
        {"prompt": "Describe the cat.\n"},
        {"prompt": "Describe the cat.\n", "response": "x"},
        {"messages": user + [{"role": "assistant", "content": "x"}]},
        {"prompt": "Describe the cat.\n", "chosen": "a", "rejected": "b"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
    ), tokenizer, DataConfig(max_length=64))
    same = [{k: got[i][k] for k in ("prompt_ids", "prompt", "fields")} for i in (0, 1, 3)]
    assert same[0] == same[1] == same[2]
    assert got[2]["prompt"] == tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert got[4]["prompt"] == "\n\nHuman: hi\n\nAssistant:"


def test_prompt_rows_keep_their_other_fields_and_location(tokenizer):
    got, _ = tokenize_prompts(rows({"prompt": "Describe the cat.\n", "answer": "42", "id": 7}), tokenizer,
                              DataConfig(max_length=64))
    assert got[0]["fields"] == {"answer": "42", "id": 7} and got[0]["where"]


def test_collate_prompts_left_pads(tokenizer):
    batch = collate_prompts([{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8]}], tokenizer.pad_token_id)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [tokenizer.pad_token_id] * 2 + [8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# --------------------------------------------------------------------------- bad input


def test_malformed_json_names_file_and_line(tmp_path, tokenizer):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    with pytest.raises(DataError, match=rf"{p}:2: malformed JSON"):
        build_stage_data("sft", DataConfig(path=str(p)), tokenizer, use_cache=False)


@pytest.mark.parametrize("row,msg", [
    ({"prompt": "a"}, "format 'prompt' cannot be used for the sft stage"),
    ({"prompt": "a", "response": 3}, "field 'response' must be a string, got int"),
    ({"prompt": None, "response": "b"}, "field 'prompt' is missing"),
    ({"messages": [{"role": "user"}]}, "message 0: needs string `role` and `content`"),
    ({"question": "a"}, "cannot tell the row format"),
])
def test_bad_rows_name_line_and_field(tmp_path, tokenizer, row, msg):
    p = jsonl(tmp_path, [{"prompt": "a", "response": "b"}, row])
    with pytest.raises(DataError, match=rf"{p}:2: .*{msg}"):
        build_stage_data("sft", DataConfig(path=str(p)), tokenizer, use_cache=False)


def test_pair_missing_rejected_and_non_string(tmp_path, tokenizer):
    p = jsonl(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=rf"{p}:2: field 'rejected' is missing"):
        build_stage_data("rm", DataConfig(path=str(p)), tokenizer, use_cache=False)
    p = jsonl(tmp_path, [{"prompt": "a", "chosen": 1, "rejected": "c"}], "b.jsonl")
    with pytest.raises(DataError, match=rf"{p}:1: field 'chosen' must be a string, got int"):
        build_stage_data("rm", DataConfig(path=str(p)), tokenizer, use_cache=False)


def test_skip_bad_rows_counts_them(tmp_path, tokenizer):
    p = jsonl(tmp_path, [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}, {"x": 1}])
    data = build_stage_data("sft", DataConfig(path=str(p), skip_bad_rows=True), tokenizer, use_cache=False)
    assert len(data.train) == 1 and "2 bad rows skipped" in data.summary


def test_empty_file_and_every_prompt_too_long(tmp_path, tokenizer):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        build_stage_data("sft", DataConfig(path=str(p)), tokenizer, use_cache=False)
    p = jsonl(tmp_path, [{"prompt": "the cat " * 50, "response": "b"}] * 3)
    with pytest.raises(DataError, match="no usable training rows .*3 dropped: prompt alone longer than max_length"):
        build_stage_data("sft", DataConfig(path=str(p), max_length=8), tokenizer, use_cache=False)


# --------------------------------------------------------------------------- sources, splits, cache


def test_json_and_parquet_sources(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(items))
    pq.write_table(pa.Table.from_pylist(items), tmp_path / "d.parquet")
    a = build_stage_data("sft", DataConfig(path=str(tmp_path / "d.json")), tokenizer, use_cache=False)
    b = build_stage_data("sft", DataConfig(path=str(tmp_path / "d.parquet")), tokenizer, use_cache=False)
    c = build_stage_data("sft", DataConfig(path=str(jsonl(tmp_path, items))), tokenizer, use_cache=False)
    assert a.train == b.train == c.train and len(a.train) == 5


def test_hf_dataset_name_loads_through_datasets(tmp_path, tokenizer):
    # `data.name` goes through datasets.load_dataset: a local dataset directory here.
    import datasets

    items = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(6)]
    datasets.Dataset.from_list(items).to_parquet(str(tmp_path / "ds" / "train.parquet"))
    data = build_stage_data("sft", DataConfig(name=str(tmp_path / "ds")), tokenizer, use_cache=False)
    assert len(data.train) == 6


def test_stage_split_is_disjoint_and_deterministic(tmp_path):
    p = jsonl(tmp_path, [{"prompt": f"p{i}", "response": "r"} for i in range(100)])
    cfg = DataConfig(path=str(p), stage_split=[2, 4, 4])
    shares = [load_rows(cfg, i)[0] for i in range(3)]
    keys = [{r.data["prompt"] for r in s} for s in shares]
    assert [len(k) for k in keys] == [20, 40, 40]
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    assert keys == [{r.data["prompt"] for r in load_rows(cfg, i)[0]} for i in range(3)]


def test_eval_ratio_and_mixture(tmp_path):
    a = jsonl(tmp_path, [{"prompt": f"a{i}", "response": "r"} for i in range(30)], "a.jsonl")
    b = jsonl(tmp_path, [{"prompt": f"b{i}", "response": "r"} for i in range(10)], "b.jsonl")
    train, ev = load_rows(DataConfig(path=str(a), eval_ratio=0.1), 0)
    assert len(train) == 27 and len(ev) == 3 and not ({r.where for r in train} & {r.where for r in ev})
    mixed, _ = load_rows(DataConfig(sources=[SourceConfig(path=str(a), weight=1.0),
                                             SourceConfig(path=str(b), weight=3.0)]), 0)
    # 40 rows in all, a quarter from a and three quarters from b (b's 10 rows repeated)
    assert len(mixed) == 40
    assert sum(r.data["prompt"].startswith("b") for r in mixed) == 30


def test_cache_is_reused_and_keyed_by_content(tmp_path, tokenizer, monkeypatch):
    p = jsonl(tmp_path, [{"prompt": "p", "response": "r"}])
    cfg = DataConfig(path=str(p), cache_dir=str(tmp_path / "cache"))
    first = build_stage_data("sft", cfg, tokenizer)
    import rlhf.data as data_mod

    monkeypatch.setitem(data_mod._TOKENIZE, "sft", lambda *a: (_ for _ in ()).throw(AssertionError("re-tokenized")))
    assert build_stage_data("sft", cfg, tokenizer).train == first.train
    jsonl(tmp_path, [{"prompt": "p", "response": "changed!"}])  # new content: the cache must not answer
    with pytest.raises(AssertionError, match="re-tokenized"):
        build_stage_data("sft", cfg, tokenizer)


# --------------------------------------------------------------------------- batching


def test_step_sampler_same_samples_whatever_the_layout():
    def step_samples(world, micro, step):
        return sorted(i for r in range(world)
                      for mb in StepSampler(64, 8, micro, world, r, seed=3).step(step) for i in mb)

    for step in (0, 5, 9):  # 9 is in the second epoch
        assert step_samples(1, 8, step) == step_samples(1, 2, step) == step_samples(2, 4, step) \
            == step_samples(4, 1, step)
    s = StepSampler(64, 8, 2, 1, 0, seed=3)
    assert len(s.step(0)) == 4 and s.steps_per_epoch == 8
    assert s.step(0) != s.step(8)  # a new epoch, a new order


def test_packing_restarts_positions_and_keeps_masks():
    exs = [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4, 5], "loss_mask": [0, 1]},
           {"input_ids": [6, 7, 8, 9], "loss_mask": [0, 0, 1, 1]}]
    packed = pack(exs, max_length=6)
    assert [p["input_ids"] for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert packed[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert packed[0]["loss_mask"] == [0, 1, 1, 0, 1]
    batch = collate_sft(packed, pad_id=0)
    assert batch["attention_mask"] is None
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]]


def test_shared_prefix_layout_by_hand():
    pairs = [{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2, 4, 5], "margin": 0.5},  # prefix [1, 2]
             {"chosen_ids": [6], "rejected_ids": [7, 8], "margin": 0.0},            # no prefix
             {"chosen_ids": [9], "rejected_ids": [10], "margin": 0.0}]
    b = collate_pairs_shared_prefix(pairs, pad_id=0, pack=True)
    # rows as wide as the longest segment (5); pairs 2 and 3 share the second row
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 0, 1, 0, 0]]
    assert b["chosen_index"].tolist() == [[0, 2], [1, 0], [1, 3]]
    assert b["rejected_index"].tolist() == [[0, 4], [1, 2], [1, 4]]
    assert b["margin"].tolist() == [0.5, 0.0, 0.0]
    allowed = [[[j for j in range(5) if b["attention_mask"][r, 0, i, j]] for i in range(5)] for r in range(2)]
    assert allowed[0] == [[0], [0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 3, 4]]  # 4 and 5 see the prefix, not 3
    assert allowed[1] == [[0], [1], [1, 2], [3], [4]]
    # unpacked: one pair per row, padding attends only to itself
    b = collate_pairs_shared_prefix(pairs, pad_id=0, pack=False)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 10, 0, 0, 0]]
    assert b["attention_mask"][2, 0].tolist()[2:] == [[False, False, True, False, False],
                                                      [False, False, False, True, False],
                                                      [False, False, False, False, True]]


def test_cat_padded_pads_each_part_to_the_widest():
    a, b = torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5], [6, 7, 8]])
    assert cat_padded([a, b], 0).tolist() == [[1, 2, 0], [3, 4, 5], [6, 7, 8]]
    assert cat_padded([a, b], 9, "left").tolist() == [[9, 1, 2], [3, 4, 5], [6, 7, 8]]
