#!/usr/bin/env bash
# Every GPU check of the project, in parts that fit the device calls of a lent GPU machine (15 minutes in all,
# 10 per call, start-up included). Each part runs under its own time limit and all within $FASTCL_GPU_BUDGET
# seconds (default 540); logs, JSON and PNG go to $OUT (default /tmp/fastcl-gpu), bundled so that at most 8
# files come back. For the lent machine, whose image has torch/triton/timm but not this package, nor DALI,
# DeepSpeed or CIFAR-10 (stage CIFAR-10 with benchmarks/stage_cifar10.py, DALI with
# ../shared/tools/stage-device-wheels.sh and export PYTHONPATH=/tmp/site).
#
#   bash benchmarks/gpu_session.sh [PART ...]     # default: tests step kernels cifar data
#
# Parts, in the order of value of the GPU-proof issue:
#   tests    the GPU-only tests: kernels in fp32/fp16/bf16 compiled for the real GPU, DALI's GPU graph, the
#            device-resident augmentation on CUDA (equal to its CPU run, seeded)
#   cifar    the CIFAR-10 speedrun (benchmarks/cifar_run.py): $FASTCL_CIFAR_RECIPES (default mocov2_r50, comma
#            list) for $FASTCL_CIFAR_EPOCHS epochs or as many as fit $FASTCL_CIFAR_BUDGET s (default 300) each, kNN
#            against minutes (needs CIFAR-10 under $FASTCL_DATA); $FASTCL_CIFAR_ARGS go to the recipe
#            (e.g. FASTCL_CIFAR_RECIPES=simclr_r50 FASTCL_CIFAR_ARGS="--preset cifar_fast")
#   step     training steps: MoCo v2 R50 hand loop / torch / fused / split BN / compiled, CIFAR split BN, SimCLR and
#            BYOL R50 hand / eager / compiled, DINO ViT-S/16, S/8 eager / compiled, MoCo v2 R50 under CUDA graphs
#            (--compile reduce-overhead, last) (all of it takes ~8 min:
#            FASTCL_STEP_K="mocov2 or dino" selects, FASTCL_BENCH_COMPILE=0 drops the compiled variants)
#   kernels  the fused kernels against torch and their floors; the engine's host overhead on an empty step
#   data     the DALI pipeline's throughput (needs DALI staged)
#   mem      benchmarks/mem_table.py --device cuda: peak memory of one MoCo v3 / DINO ViT-S/B/L step, bf16, batch 64
#            at 224 (DINO + 4 local crops), with and without --grad-ckpt (the README's memory table, GPU rows)
#   tune     benchmarks/tune_infonce.py: every InfoNCE kernel alone over candidate tiles, checked against the
#            shipped tile and timed (the shipped tiles were chosen from ptxas counts, untimed); $FASTCL_TUNE_BUDGET s
# Two calls with the CIFAR-10 staging (one chunk each), a third if >= 4 minutes of device time are left:
#   1. carry [".devdata1"]: mkdir -p /tmp/dd && cp .devdata1/* /tmp/dd/ && FASTCL_COMMIT=<sha> bash benchmarks/gpu_session.sh tests step kernels
#   2. carry [".devdata2"]: cp .devdata2/* /tmp/dd/ && python3 benchmarks/stage_cifar10.py unpack /tmp/dd --root /tmp/fdata &&
#      FASTCL_DATA=/tmp/fdata FASTCL_CIFAR_RECIPES=mocov2_r50,simclr_r50 FASTCL_CIFAR_BUDGET=170 bash benchmarks/gpu_session.sh cifar mem
#   3. FASTCL_TUNE_BUDGET=150 bash benchmarks/gpu_session.sh tune   (the InfoNCE tiles, timed: commit the winners)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastcl-gpu}
PY=${PY:-python3}
mkdir -p "$OUT/logs"
export HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions" PYTHONUNBUFFERED=1
BENCH_JSON=/tmp/fastcl_bench.jsonl  # kept on the machine between calls: cifar sizes its run from the step bench
if ! $PY -c "import fastcl.kernels" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/logs/install.log" 2>&1 ||
    { ln -sfn ../kernels fastcl/kernels; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }  # (a scratch copy)
fi
# the device copy's .git can lag the tree that travels: pass FASTCL_COMMIT=$(git rev-parse --short HEAD) from here
{ date -u +%FT%TZ; echo "commit ${FASTCL_COMMIT:-unknown (pass FASTCL_COMMIT)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1; nproc; } >"$OUT/env.txt" 2>&1

BUDGET=${FASTCL_GPU_BUDGET:-540}
step() {  # step NAME SECONDS CMD...: run, keep the log, print one summary line
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 20)); then echo "$name: skipped, ${BUDGET} s budget spent"; return; fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $limit); $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/logs/$name.log" | tail -1)"
}
PYTEST="$PY -m pytest -p no:cacheprovider"
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n ${FASTCL_TEST_PROCS:-6}"  # compile kernels in parallel
run_part() {
  case $1 in
    tests) step tests_gpu "${FASTCL_TESTS_LIMIT:-120}" $PYTEST tests/kernels tests/data/test_dali.py tests/data/test_dali_color.py \
             tests/data/test_dali_resume.py tests/data/test_dali_shards.py tests/engine/test_grad_ckpt.py \
             tests/data/test_gpu_augment.py::test_cuda_matches_cpu_and_is_deterministic \
             tests/engine/test_compile.py::test_cuda_graph_steps_equal_eager \
             -q -rs $XDIST --timeout 90 --junitxml "$OUT/logs/tests_gpu.xml" ;;
    cifar) step cifar "$((${FASTCL_CIFAR_BUDGET:-300} + 30))" $PY benchmarks/cifar_run.py --budget "${FASTCL_CIFAR_BUDGET:-300}" \
             --recipe "${FASTCL_CIFAR_RECIPES:-mocov2_r50}" ${FASTCL_CIFAR_EPOCHS:+--epochs "$FASTCL_CIFAR_EPOCHS"} \
             --out "$OUT/cifar" --step-json "$BENCH_JSON" ${FASTCL_CIFAR_ARGS:+-- $FASTCL_CIFAR_ARGS} ;;
    step) FASTCL_BENCH_JSON=$BENCH_JSON step bench_train_step "${FASTCL_STEP_LIMIT:-150}" $PYTEST benchmarks/bench_train_step.py \
             -s -q --benchmark-json "$OUT/logs/bench_train_step.json" ${FASTCL_STEP_K:+-k "$FASTCL_STEP_K"} ;;
    kernels) step bench_kernels "${FASTCL_KERNELS_LIMIT:-120}" $PYTEST benchmarks/bench_infonce.py benchmarks/bench_ema.py \
             benchmarks/bench_dino_loss.py benchmarks/bench_queue.py benchmarks/bench_sinkhorn.py benchmarks/bench_overhead.py -s -q \
             --benchmark-json "$OUT/logs/bench_kernels.json" ;;
    data) step bench_data "${FASTCL_DATA_LIMIT:-120}" $PYTEST benchmarks/bench_data.py -s -q \
             --benchmark-json "$OUT/logs/bench_data.json" ;;
    mem) step mem_table "${FASTCL_MEM_LIMIT:-150}" $PY benchmarks/mem_table.py --device cuda --out "$OUT/mem_table.json" ;;
    tune) step tune_infonce "$((${FASTCL_TUNE_BUDGET:-120} + 90))" $PY benchmarks/tune_infonce.py \
             --budget "${FASTCL_TUNE_BUDGET:-120}" --out "$OUT/tune_infonce.json" ;;
    *) echo "unknown part $1 (tests cifar step kernels data mem tune)"; return 1 ;;
  esac
}
{
  cat "$OUT/env.txt"
  for part in "${@:-tests step kernels cifar data}"; do for p in $part; do run_part "$p"; done; done
  echo; echo "== results =="
  grep -hE "^\[|speedup|floor|ratio|projected|img/s|budget|ms/step|cifar_run|shipped|WRONG|'graphs'" "$OUT"/logs/bench_*.log \
    "$OUT"/logs/cifar.log "$OUT"/logs/tune_infonce.log 2>/dev/null
  grep -hE "^\| (MoCo|DINO)" "$OUT"/logs/mem_table.log 2>/dev/null
  grep -hE "^(FAILED|ERROR)|(passed|failed|error)" "$OUT"/logs/tests_gpu.log 2>/dev/null | tail -30
} 2>&1 | tee "$OUT/summary.txt"
# the ratios and floor multiples as a picture, $OUT/bench_ratios.png (python -m fastcl.viz bench)
ls "$OUT"/logs/bench_*.json >/dev/null 2>&1 &&
  $PY -m fastcl.viz bench "$OUT"/logs --out "$OUT" 2>&1 | tee -a "$OUT/summary.txt"  # (a folder: a part cut off by its time limit leaves an empty JSON, skipped)
[ -f "$BENCH_JSON" ] && cp "$BENCH_JSON" "$OUT/bench_steps.jsonl"
# at most 8 files come back, 2 folders down: the summary, the JSON/PNG results, and the logs as one archive
[ -d "$OUT/cifar" ] && { cp "$OUT"/cifar/knn_vs_minutes.png "$OUT"/ 2>/dev/null
  for d in "$OUT"/cifar/*/; do r=$(basename "$d"); cp "$d/cifar_run.json" "$OUT/logs/cifar_run_$r.json" 2>/dev/null
    cp "$d/log.jsonl" "$OUT/logs/cifar_log_$r.jsonl" 2>/dev/null; cp "$d/train.log" "$OUT/logs/cifar_train_$r.log" 2>/dev/null; done
  rm -rf "$OUT/cifar"; }
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
ls -la "$OUT"
