#!/usr/bin/env bash
# One script for a CUDA machine (issue 11), about 5 minutes, never part of CI:
#   1. prediction cost at 124M parameters, fp32 and bf16, against a fused AdamW step and
#      against the memory-bandwidth limit (benchmarks/bench_gpu.py);
#   2. the GPU test subset (pytest -k cuda);
#   3. the runtime overhead of the pipeline methods on the visible GPUs (NCCL with 2 ranks when
#      there are 2 or more GPUs, else one process), mlp stage, fused AdamW;
# then one summary table. Results: benchmarks/results/gpu/*.json (new dated files where one
# exists already). Run from anywhere:  bash benchmarks/gpu.sh   (PYTHON=... to pick the
# interpreter; default .venv/bin/python, else python3). Then: python tools/gen_docs.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: no CUDA device visible to $PY (torch missing, or torch.cuda.is_available() is False); nothing run" >&2
  exit 2
fi
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
LOG="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

echo "== 1/3 prediction cost (124M parameters, fp32 and bf16)"
timeout 240 "$PY" -m benchmarks.bench_gpu --repeats 20 | tee "$LOG/cost.txt" || status=1

echo "== 2/3 GPU tests"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_robustness_core.py tests/test_one_pass.py | tee "$LOG/tests.txt" || status=1

echo "== 3/3 runtime overhead on the visible GPUs"
overhead="$OUT/pipeline_overhead.json"
DEFAULT="$("$PY" -c 'from predictopt.pipeline import DEFAULT_METHOD; print(DEFAULT_METHOD)')"
if [ -e "$overhead" ]; then overhead="$OUT/pipeline_overhead-$(date -u +%Y%m%d-%H%M%S).json"; fi
timeout 120 "$PY" -m benchmarks.bench_pipeline --device cuda --stage mlp --optimizer fused \
  --variants gpipe pipedream pipeoptim pipeoptim-lean "$DEFAULT" --rounds 3 --warmup 2 --steps 4 \
  --out "$overhead" | tee "$LOG/overhead.txt" || status=1

echo
echo "==================== summary ===================="
"$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__)'
grep -E '^(device|\||---)' "$LOG/cost.txt" || echo "prediction cost: FAILED (see above)"
grep -E '^(stage|plain|gpipe|pipedream|pipeoptim)' "$LOG/overhead.txt" || echo "overhead: FAILED (see above)"
tail -n 1 "$LOG/tests.txt" | sed 's/^/GPU tests: /'
echo "results under $OUT/; render the docs with: $PY tools/gen_docs.py"
exit $status
