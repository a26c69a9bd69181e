"""Config loading, overrides and validation: every mistake named with its key and source."""

import pytest
import yaml

from rlhf.config import (ConfigError, PPOConfig, RMConfig, SFTConfig, check_batch_sizes, dump, from_dict,
                         load_stage_config, parse_override)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


SINGLE = """\
output_dir: {out}
model:
  arch: {{model_type: llama, hidden_size: 32}}
data:
  path: {data}
optim:
  lr: 3e-4
"""


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n')
    return p


def test_single_stage_file_and_overrides(tmp_path, data_file):
    cfg_path = write(tmp_path, SINGLE.format(out=tmp_path / "o", data=data_file))
    cfg = load_stage_config(SFTConfig, cfg_path, ["optim.lr=1e-5", "train.micro_batch_size=2"])
    assert cfg.optim.lr == 1e-5  # "1e-5" is a string to YAML 1.1; the float field takes it
    assert cfg.train.micro_batch_size == 2
    assert cfg.model.arch == {"model_type": "llama", "hidden_size": 32}


def test_unknown_key_names_line_and_suggests(tmp_path, data_file):
    text = SINGLE.format(out=tmp_path / "o", data=data_file) + "train:\n  micro_bach_size: 2\n"
    cfg_path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_stage_config(SFTConfig, cfg_path)
    msg = str(e.value)
    assert f"{cfg_path}:9" in msg and "train.micro_bach_size" in msg and "micro_batch_size" in msg


def test_invalid_value_names_key_and_source(tmp_path, data_file):
    cfg_path = write(tmp_path, SINGLE.format(out=tmp_path / "o", data=data_file))
    with pytest.raises(ConfigError, match=r"override 'optim.lr=-1'.*optim.lr: must be > 0"):
        load_stage_config(SFTConfig, cfg_path, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"c.yaml:7: optim.lr: must be > 0"):
        load_stage_config(SFTConfig, write(tmp_path, SINGLE.format(out=tmp_path / "o", data=data_file)
                                           .replace("3e-4", "-3")))
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage: must be 0, 1, 2 or 3"):
        load_stage_config(SFTConfig, cfg_path, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: expected an integer, got 'two'"):
        load_stage_config(SFTConfig, cfg_path, ["train.micro_batch_size=two"])
    with pytest.raises(ConfigError, match=r"deepspeed.precision: expected one of"):
        load_stage_config(SFTConfig, cfg_path, ["deepspeed.precision=fp8"])
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage: bf16 training needs zero_stage >= 1"):
        load_stage_config(SFTConfig, cfg_path, ["deepspeed.precision=bf16", "deepspeed.zero_stage=0"])
    cfg_path = write(tmp_path, SINGLE.format(out=tmp_path / "o", data=data_file))
    load_stage_config(SFTConfig, cfg_path, ["deepspeed.precision=bf16", "deepspeed.zero_stage=1"])


def test_missing_data_file_is_named(tmp_path):
    cfg_path = write(tmp_path, SINGLE.format(out=tmp_path / "o", data=tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"c.yaml:5: data.path: no such file"):
        load_stage_config(SFTConfig, cfg_path)


def test_batch_sizes_must_divide(tmp_path, data_file):
    cfg_path = write(tmp_path, SINGLE.format(out=tmp_path / "o", data=data_file))
    cfg = load_stage_config(SFTConfig, cfg_path, ["train.global_batch_size=12", "train.micro_batch_size=4"])
    check_batch_sizes(cfg, 1)  # 12 = 4 x 3 accumulation steps
    with pytest.raises(ConfigError, match=r"global_batch_size = 12 must be divisible by .* = 8 \(ranks = 2\)"):
        check_batch_sizes(cfg, 2)
    assert cfg.train.accumulation_steps(1) == 3


MULTI = """\
output_dir: {root}
seed: 7
data:
  path: {data}
optim:
  lr: 1e-4
sft:
  model: {{arch: {{model_type: llama}}}}
rm:
  model:
    path: ${{output_dir}}/sft/final
  optim: {{lr: 5e-5}}
"""


def test_multi_stage_sections_share_and_interpolate(tmp_path, data_file):
    root = tmp_path / "run"
    cfg_path = write(tmp_path, MULTI.format(root=root, data=data_file))
    sft = load_stage_config(SFTConfig, cfg_path)
    assert sft.output_dir == f"{root}/sft" and sft.seed == 7 and sft.optim.lr == 1e-4
    rm = load_stage_config(RMConfig, cfg_path, ["train.epochs=2"])
    assert rm.model.path == f"{root}/sft/final"
    assert rm.optim.lr == 5e-5 and rm.train.epochs == 2 and rm.output_dir == f"{root}/rm"
    assert rm.data.truncation == "left"  # the RM's own default
    with pytest.raises(ConfigError, match="has no `ppo:` section"):
        load_stage_config(PPOConfig, cfg_path)


def test_error_in_a_section_names_its_line(tmp_path, data_file):
    text = MULTI.format(root=tmp_path, data=data_file).replace("lr: 5e-5", "lr: 0")
    cfg_path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"c.yaml:12: optim.lr: must be > 0"):
        load_stage_config(RMConfig, cfg_path)


def test_saved_config_round_trips(tmp_path, data_file):
    cfg_path = write(tmp_path, SINGLE.format(out=tmp_path / "o", data=data_file))
    cfg = load_stage_config(SFTConfig, cfg_path, ["data.stage_split=2,4,4"])
    assert cfg.data.stage_split == [2.0, 4.0, 4.0]
    again = from_dict(SFTConfig, yaml.safe_load(dump(cfg)))
    assert again == cfg


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("x=hello world") == ("x", "hello world")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_ppo_batch_checks(tmp_path, data_file):
    text = f"""
output_dir: {tmp_path}/o
data: {{path: {data_file}}}
policy: {{model: {{arch: {{model_type: llama}}}}}}
value: {{model: {{arch: {{model_type: llama}}}}}}
reward: {{model: {{arch: {{model_type: llama}}}}}}
rollout: {{batch_size: 12}}
train: {{global_batch_size: 8, micro_batch_size: 4}}
"""
    with pytest.raises(ConfigError, match="rollout.batch_size: 12 must be a multiple of train.global_batch_size"):
        load_stage_config(PPOConfig, write(tmp_path, text))
