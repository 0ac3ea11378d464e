#!/usr/bin/env bash
# The GPU checks in one short script (`make gpu-check`): the CUDA tests (tests/test_cuda.py: each path
# against the CPU) and the train benchmark on the GPU, at the demo's size and at IRT's SOP-size memory.
#
# Run it on a machine with a CUDA GPU whose python3 has torch (with torchvision), scikit-learn, pandas,
# matplotlib, seaborn, tqdm and pytest; what it lacks (faiss-cpu, pytorch-metric-learning, timm at
# this project's version) travels as wheels: `make gpu-wheels` puts them in .whl/ (git-ignored), and
# this script installs them into /tmp/site. Results in $OUT (default gpu-check/): tests.log, bench.log
# and RESULTS.md (bench/RESULTS.md with the GPU sections added: copy it over bench/RESULTS.md).
# Nothing here needs the internet.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing .whl/*.whl failed"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
"$PY" - <<'EOF' || { echo "gpu_check: no CUDA GPU visible to torch; nothing to check"; exit 2; }
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
status=0
# bounded, so that a hang cannot spend a lease: 4 min per test where pytest-timeout is there, 4 min per benchmark
per_test=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=240")
"$PY" -m pytest -q -p no:cacheprovider $per_test -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" || status=1
cp bench/RESULTS.md "$OUT/RESULTS.md"
: > "$OUT/bench.log"
# the demo's size (ViT-Tiny, 28 px, patch 7), each CUDA switch (bf16, fused AdamW, pinned memory,
# torch.compile) on and off
timeout 240 "$PY" -m bench train --device cuda --steps 20 --repeats 10 --warmup 5 --switches \
    --section train-cuda --results "$OUT/RESULTS.md" 2>&1 | tee -a "$OUT/bench.log" || status=1
# IRT §4.2 at SOP's size: DeiT-S/16 at 224 px, batch 64, a memory of 59,551 (issue 11, item 7)
timeout 240 "$PY" -m bench train --device cuda --backbone deit_small_patch16_224 --img-size 224 --patch-size native \
    --memory-size 59551 --steps 20 --repeats 10 --warmup 5 --no-switches \
    --section train-xbm-cuda --results "$OUT/RESULTS.md" 2>&1 | tee -a "$OUT/bench.log" || status=1
echo "gpu_check: $([ "$status" -eq 0 ] && echo passed || echo FAILED); logs and RESULTS.md in $OUT/"
exit "$status"
