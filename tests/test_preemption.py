"""No lost work: a directory that is not ours is refused, not skipped."""

import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from rlhf.trainers.base import RunDirError
from rlhf.trainers.sft import SFTTrainer
from test_sft import make_cfg, sft_data  # noqa: F401 (sft_data: a fixture)


def test_a_final_dir_without_our_config_is_refused_not_skipped(tmp_path, sft_data, tokenizer_dir, backbone):
    (tmp_path / "out" / "final").mkdir(parents=True)
    (tmp_path / "out" / "final" / "weights.bin").write_text("someone else's")
    with pytest.raises(RunDirError, match="not an rlhf run directory"):
        SFTTrainer(make_cfg(tmp_path, sft_data, tokenizer_dir), backbone).fit()
    # the pipeline refuses it before running any stage (here the first: nothing is written)
    root = tmp_path / "run"
    (root / "sft" / "final").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", str(ROOT / "configs" / "quickstart.yaml"),
                           f"output_dir={root}"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds final/ but no config.yaml" in proc.stderr, proc.stdout + proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["sft"]
    assert (tmp_path / "out" / "final" / "weights.bin").read_text() == "someone else's"
