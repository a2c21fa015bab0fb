#!/usr/bin/env bash
# The one command to run on the lent GPU machine (no network, Python 3.12, its own PyTorch), from
# the repository root with .whl/ carried along (prepared by benchmarks/gpu_wheels.sh) and, for the
# official-code ratio, .reference/ (the official repositories fetched beside the project, never
# committed: .reference/Restormer, .reference/HI-Diff, .reference/swintormer):
#   bash benchmarks/gpu_machine.sh OUT_DIR [gpu_check.py options]
# Installs this package and the dependencies the machine lacks into /tmp/site (its own PyTorch
# stays), runs the GPU tests, then gpu_check.py within what is left of 8 minutes; results in OUT_DIR
# (results.json names the row that was running if the time limit stops it).
set -uo pipefail
OUT_DIR=${1:?usage: gpu_machine.sh OUT_DIR [gpu_check options]}
shift
mkdir -p "$OUT_DIR"
started=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# The working tree's package (src/, configs included) before the installed wheels.
export PYTHONPATH=$PWD/src:/tmp/site:$PWD/benchmarks PYTHONUNBUFFERED=1
echo "installed in $(( $(date +%s) - started )) s"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT_DIR/device.txt"
# The tests that need a GPU (skipped everywhere else); only their files are collected, as the
# other test files import packages the machine does not have (notebook runners).
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_restore.py tests/test_stage.py 2>&1 | tee "$OUT_DIR/gpu_tests.txt" | tail -15
left=$(( 480 - ($(date +%s) - started) - 20 ))
reference=()
[ -d .reference ] && reference=(--reference .reference)
timeout $(( left + 15 )) python3 benchmarks/gpu_check.py --out "$OUT_DIR" --budget-seconds "$left" "${reference[@]}" "$@"
