"""Every shipped config loads and validates against the code (torchtune's habit)."""

from pathlib import Path

import pytest

from rlhf.cli import config_class
from rlhf.config import STAGES, check_batch_sizes, from_dict, load_yaml, resolve_stage_dict, validate
from rlhf.pipeline import chain_defaults

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path):
    data, where = load_yaml(path)
    chain_defaults(data, str(data.get("output_dir")))
    stages = [s for s in STAGES if s in data]
    assert stages, f"{path} has no stage section"
    for stage in stages:
        stage_dict, stage_where = resolve_stage_dict(data, where, stage, (), str(path))
        cfg = from_dict(config_class(stage), stage_dict, stage_where)
        validate(cfg, stage_where)
        # the layouts it is written for: one rank (the CPU configs) or 8 GPUs per node
        ranks = 1 if path.name in ("quickstart.yaml", "smollm2.yaml") else 8
        check_batch_sizes(cfg, ranks)
