#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU image lacks, for its Python 3.12.
set -euo pipefail
mkdir -p .gpu/wheels && cd .gpu/wheels
pip download --no-deps -q deepspeed==0.19.8 hjson py-cpuinfo trl==1.12.0 datasets==5.2.0 dill
pip download --no-deps -q --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12 \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection multiprocess==0.70.19
