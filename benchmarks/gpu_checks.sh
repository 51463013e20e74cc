#!/usr/bin/env bash
# kvtier's checks on a GPU machine where CUDA vLLM is staged at /tmp/site (../shared/recipes/cuda-vllm):
# the data-path unit tests on CUDA (int8 slots included), the CUDA vLLM end-to-end test, and the data-path micro-benchmark.
# Wheels for pytest (not on the device) are taken from .device-wheels/ when present.
# Usage (repository root): bash benchmarks/gpu_checks.sh   (results under $OUT, or /tmp/kvtier-gpu)
set -uo pipefail
OUT=${OUT:-/tmp/kvtier-gpu}
mkdir -p "$OUT"
if [ -d .device-wheels ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/pyt .device-wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD:/tmp/pyt:${PYTHONPATH:-}
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
status=0
python3 -m pytest -q -p no:cacheprovider --noconftest tests/unit/test_chunk_mover.py tests/unit/test_datapath.py \
  tests/unit/test_int8_slots.py tests/unit/test_layered_loads.py tests/unit/test_group_mover.py tests/unit/test_vllm_compat.py \
  2>&1 | tail -5 | tee "$OUT/unit_cuda.log" || status=1
KVTIER_ADMISSION_POLICY=always python3 -m pytest -q -p no:cacheprovider --noconftest -rA tests/e2e/test_vllm_cuda.py 2>&1 | grep -v -E "^\(EngineCore|it/s\]" | tail -60 | tee "$OUT/e2e_cuda.log" || status=1
python3 benchmarks/gpu_datapath.py --out-dir "$OUT" --repeats 5 2>&1 | grep -v "^$" | tail -12 || status=1
exit $status
