#!/usr/bin/env bash
# Install what the lent GPU machine's image lacks (it has torch, transformers, peft,
# accelerate; no network) from wheels carried in .gpu/wheels. This package itself runs
# from the checkout: `export PYTHONPATH=$PWD` (an editable install would need setuptools
# from the network). Build the wheel folder here with benchmarks/gpu_wheels.sh.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation .gpu/wheels/deepspeed-*.tar.gz
python3 -c "import torch, deepspeed, transformers, trl, datasets; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, torch.cuda.get_device_name())"
