#!/usr/bin/env bash
# Every GPU check of the project in one device call (about 8 minutes on one H100/H200): the GPU-only tests,
# then every benchmark (data pipeline first: the open DALI issue; training step; kernels), each step under its
# own time limit and all within $FASTCL_GPU_BUDGET seconds (default 540: a device call ends at 600 s and the
# staged DALI must be unpacked first), logs in $OUT. For the lent device machine, whose image has
# torch/triton/timm but not this package (nor DALI or DeepSpeed: stage them first with
# ../shared/tools/stage-device-wheels.sh and export PYTHONPATH=/tmp/site).
#
#   bash benchmarks/gpu_session.sh            # logs in $OUT (default /tmp/fastcl-gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastcl-gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
if ! python -c "import fastcl.kernels" 2>/dev/null; then
  python -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 ||
    { ln -sfn ../kernels fastcl/kernels; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }  # (a scratch copy)
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1; } >"$OUT/env.txt" 2>&1

BUDGET=${FASTCL_GPU_BUDGET:-540}
step() {  # step NAME SECONDS CMD...: run, keep the log, print one summary line
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 20)); then echo "$name: skipped, ${BUDGET} s budget spent"; return; fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s; $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/$name.log" | tail -1)"
}
{
  cat "$OUT/env.txt"
  step tests_gpu 180 python -m pytest tests/kernels tests/data/test_dali.py tests/data/test_dali_color.py -q -rs -x
  step bench_data 120 python -m pytest benchmarks/bench_data.py -s -q -p no:cacheprovider
  step bench_train_step 90 python -m pytest benchmarks/bench_train_step.py -s -q -p no:cacheprovider
  step bench_kernels 200 python -m pytest benchmarks/bench_infonce.py benchmarks/bench_ema.py \
    benchmarks/bench_dino_loss.py benchmarks/bench_queue.py benchmarks/bench_sinkhorn.py -s -q -p no:cacheprovider
  echo; echo "== results =="
  grep -hE "^\[|speedup|floor|ratio [0-9]|projected|budget" "$OUT"/bench_*.log
} 2>&1 | tee "$OUT/summary.txt"
