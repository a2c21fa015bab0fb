#!/usr/bin/env bash
# Prepares, on a machine with pip's registries, the wheels that the lent GPU machine lacks (it has no
# network; its Python is 3.12 with PyTorch, Lightning, torchmetrics, timm, einops, OpenCV,
# scikit-image, rich, safetensors and Pillow installed) into .whl/ (git-ignored), for
# benchmarks/gpu_machine.sh. Run from the repository root: bash benchmarks/gpu_wheels.sh
# With REFERENCE=DIR (checkouts of the official repositories, as train_step.py's --reference), the
# three official architecture files are copied into .reference/ (git-ignored) for the official-code
# ratio: REFERENCE=~/src bash benchmarks/gpu_wheels.sh
set -euo pipefail
WHEELS=.whl
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
# omegaconf's parser runtime is published only as a source archive: built here into a py3 wheel.
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "antlr4-python3-runtime==4.9.3"
# The versions of requirements/lock.txt (the machine has diffusers' own needs: huggingface-hub, regex;
# pytest runs the GPU tests there).
pins=$(grep -iE '^(hydra-core|omegaconf|lpips|diffusers|lmdb|pytest|pytest-timeout|iniconfig|pluggy)==' requirements/lock.txt)
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$WHEELS" $pins
ls -l "$WHEELS"
du -sh "$WHEELS"
if [ -n "${REFERENCE:-}" ]; then
    rm -rf .reference
    for file in Restormer/basicsr/models/archs/restormer_arch.py HI-Diff/hi_diff/archs/Transformer_arch.py \
        swintormer/basicsr/archs/Swintormer_arch.py; do
        mkdir -p ".reference/$(dirname "$file")" && cp "$REFERENCE/$file" ".reference/$file"
    done
    echo "official architecture files in .reference/ (carry it with .whl/)"
fi
