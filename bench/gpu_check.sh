#!/usr/bin/env bash
# The GPU check, as one prepared script for a lent GPU box (see docs/performance.md).
#
#   bash bench/gpu_check.sh prepare   # here: copy the pure-Python packages the box lacks
#                                     # (omegaconf, antlr4, hydra, submitit) into .devsite/
#   bash bench/gpu_check.sh run       # there: GPU tests, the GPU benchmarks, packing (~8 min)
#   bash bench/gpu_check.sh compile   # there, if time is left: the train step under
#                                     # torch.compile (train.compile=true), dhm-s0 and resnet
#
# With the device tool: run(command="bash bench/gpu_check.sh run", carry=[".devsite"],
# timeout_s=560). The box has torch, accelerate, h5py, numpy, pyyaml, torchvision and pytest;
# results go to $OUT (or bench/results/gpu-<time>/): gpu_tests.log, bench_gpu.json/.log.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf .devsite && mkdir -p .devsite
  for pkg in omegaconf antlr4 hydra submitit; do
    cp -r "$site/$pkg" .devsite/ || { echo "prepare: $pkg not in $site (make setup first)"; exit 1; }
  done
  du -sh .devsite
  ;;
run)
  out=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
  mkdir -p "$out"
  export PYTHONPATH="$PWD/.devsite:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  py=${PYTHON:-python3}
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv |
    tee "$out/gpu.txt"
  $py -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate",
accelerate.__version__, torch.cuda.get_device_name())' | tee -a "$out/gpu.txt"
  # Correctness first (a fast path that is wrong is not worth timing), ~2-3 min. On a box
  # with two GPUs tests/test_gpu.py also runs two-rank DDP under both cluster.gpu_bind styles
  # (NCCL, each rank on its own GPU); with one it says it skipped them.
  timeout 240 $py -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
    tests/test_gpu.py tests/test_data.py tests/test_objectives.py 2>&1 | tee "$out/gpu_tests.log"
  tests=${PIPESTATUS[0]}
  # Then speed: width 64, batch 400 (the defaults), bf16 + channels_last, ~3-4 min.
  timeout 300 $py -m bench.run --only pipeline,train_step,eval_cost,flops \
    --out "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
  bench=${PIPESTATUS[0]}
  # Packed runs (cluster.runs_per_task): width-16 DHMs side by side, N = 1, 2, 4, 8, ~2 min.
  timeout 200 $py -m bench.run --only packing --width 16 --images 4000 --steps 10 \
    --out "$out/bench_gpu_packing.json" 2>&1 | tee "$out/bench_gpu_packing.log"
  [ "${PIPESTATUS[0]}" = 0 ] || bench=1
  echo "gpu tests exit $tests, benchmarks exit $bench; results in $out"
  [ "$tests" = 0 ] && [ "$bench" = 0 ]
  ;;
compile)
  out=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
  mkdir -p "$out"
  export PYTHONPATH="$PWD/.devsite:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  timeout 420 ${PYTHON:-python3} -m bench.run --only train_step,flops --compile \
    --models dhm-s0,resnet --out "$out/bench_gpu_compile.json" 2>&1 |
    tee "$out/bench_gpu_compile.log"
  ;;
*)
  echo "usage: bash bench/gpu_check.sh prepare|run|compile" >&2
  exit 2
  ;;
esac
