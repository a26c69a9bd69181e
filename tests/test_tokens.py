"""Tokenizers of real families: pad choice, end tokens, BOS, and model sources checked
before any work (rlhf.tokens, rlhf.model_source). Tokenizers only, no training."""

import json

import pytest
import torch

from families import FAMILIES
from rlhf.config import ModelConfig, TokenizerConfig
from rlhf.model_source import check_model_source
from rlhf.models import load_tokenizer, response_stop_ids
from rlhf.rollout import action_mask_from_response, end_at_eos
from rlhf.tokens import encode_prompt, end_of_turn_token


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pad_is_never_an_end_token(name, family_dirs):
    f = FAMILIES[name]
    cfg = TokenizerConfig(path=str(family_dirs[name]))
    lines = []
    tok = load_tokenizer(cfg, log=lines.append)
    stops = response_stop_ids(tok, cfg)
    assert tok.pad_token == f["pad_expected"]
    assert tok.pad_token_id not in stops
    assert ("added to the vocabulary" in lines[0]) == (f["pad_expected"] not in f["specials"])
    # The end of a reply: the template's end-of-turn token is a stop token, and so is
    # every id the checkpoint's generation_config lists.
    vocab = tok.get_vocab()
    assert vocab[f["end"]] in stops
    for t in f["gen_eos"] or []:
        assert vocab[t] in stops


def test_end_of_turn_token(family_dirs):
    ends = {name: load_tokenizer(TokenizerConfig(path=str(d))) for name, d in family_dirs.items()}
    assert ends["llama3"].convert_ids_to_tokens(end_of_turn_token(ends["llama3"])) == "<|eot_id|>"
    assert ends["chatml_pad_is_eos"].convert_ids_to_tokens(end_of_turn_token(ends["chatml_pad_is_eos"])) == "<|im_end|>"
    assert end_of_turn_token(ends["bare"]) is None  # no template


def test_no_double_bos(family_dirs):
    tok = load_tokenizer(TokenizerConfig(path=str(family_dirs["llama3"])))
    bos = tok.bos_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.startswith("<|begin_of_text|>")
    assert tok(rendered)["input_ids"][:2] == [bos, bos]  # what a plain call does
    ids = encode_prompt(tok, rendered)
    assert ids[0] == bos and ids[1] != bos
    plain = encode_prompt(tok, "Say ok.")  # a plain prompt still gets its one BOS
    assert plain[0] == bos and plain[1] != bos


def test_action_mask_ends_at_any_stop_token():
    # Stop ids 7 and 9; pad 0. Row 0 ends at 9, row 1 at 7, row 2 never ends.
    resp = torch.tensor([[5, 9, 4, 7], [7, 3, 3, 3], [5, 5, 5, 5]])
    assert action_mask_from_response(resp, [7, 9]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    ids, mask = end_at_eos(resp, [7, 9], pad_id=0)
    assert ids.tolist() == [[5, 9, 0, 0], [7, 0, 0, 0], [5, 5, 5, 5]]


def test_chat_reply_ends_at_end_of_turn(family_dirs):
    """ChatML writes a newline after <|im_end|>; the reply (RM pairs, SFT targets) stops
    at <|im_end|>, where generation stops."""
    from rlhf.config import DataConfig
    from rlhf.data.formats import tokenize_pairs, tokenize_sft
    from rlhf.data.sources import Row

    tok = load_tokenizer(TokenizerConfig(path=str(family_dirs["chatml_pad_is_eos"])))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    user = [{"role": "user", "content": "Hi"}]
    pair = Row({"prompt": user, "chosen": [{"role": "assistant", "content": "Hello there"}],
                "rejected": [{"role": "assistant", "content": "ok"}]}, "x.jsonl:1")
    (ex,), _ = tokenize_pairs([pair], tok, DataConfig(path="x.jsonl", max_length=200))
    assert ex["chosen_ids"][-1] == end and ex["rejected_ids"][-1] == end
    chat = Row({"messages": user + [{"role": "assistant", "content": "Hello there"}]}, "x.jsonl:2")
    (sft,), _ = tokenize_sft([chat], tok, DataConfig(path="x.jsonl", max_length=200))
    trained = [i for i, m in zip(sft["input_ids"], sft["loss_mask"]) if m]
    assert trained[-1] == end and sft["input_ids"][-1] == end
    assert tok.decode(trained[:-1]) == "Hello there"


def test_model_sources_checked_before_work(tmp_path, family_dirs):
    with pytest.raises(ValueError, match=r"policy.model: no such model directory: /nonexistent/model"):
        check_model_source(ModelConfig(path="/nonexistent/model"), "policy.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model: .*empty holds no config.json"):
        check_model_source(ModelConfig(path=str(tmp_path / "empty")), "model")
    with pytest.raises(ValueError, match="model: no such GGUF file: .*missing.gguf"):
        check_model_source(ModelConfig(path=str(tmp_path / "missing.gguf")), "model")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="bad.gguf is not a GGUF file"):
        check_model_source(ModelConfig(path=str(bad)), "model")
    with pytest.raises(ValueError, match="model: 'no-such-org/no-such-model' is not a local directory"):
        check_model_source(ModelConfig(path="no-such-org/no-such-model"), "model")
    check_model_source(ModelConfig(path=str(family_dirs["bare"])), "model")  # a good one passes


def test_cli_reports_a_missing_model_in_one_line(tmp_path, task_dir):
    import subprocess
    import sys

    from conftest import subprocess_env

    cfg = tmp_path / "sft.yaml"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "model": {"path": str(tmp_path / "nope")},
                               "data": {"path": str(task_dir / "sft_train.jsonl")}}))
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "sft", str(cfg)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err[-1] == f"error: model: no such model directory: {tmp_path / 'nope'}", proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
