#!/usr/bin/env bash
# Every GPU figure of the project in one prepared run, for a GPU lent for a few minutes.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR             # on the GPU machine, from the repo root
#   bash benchmarks/gpu_suite.sh OUT_DIR --dry-run   # the same phases on the CPU, tiny sizes
#
# Started from the repository root on a fresh machine that has torch and triton but no registry,
# it installs what is missing from the wheels carried in .whl/ (../shared/tools/offline-wheels.sh
# collects them: deepspeed, webdataset and their small dependencies, about 2 MiB), builds the C++
# extension, then runs each phase below in its own time box, going on past a phase that fails or
# runs out of time. Every phase writes its log and its JSON/PNG files into OUT_DIR; the last one
# writes OUT_DIR/SUMMARY.md (each target, the figure, pass/fail; benchmarks/gpu_summary.py).
# The boxes add up to 8 minutes (benchmarks/NOTES.md, "The prepared GPU run", has the command
# for the device tool, what to carry and the minutes each phase took).
#
#   phase        box   what
#   setup         45s  wheels, the C++ extension, nvidia-smi, versions
#   tests         90s  the GPU tests: compiled kernels against references, no host sync in the
#                      step, attention backends agreeing, the pinned hand-over, the captured
#                      step against the eager one
#   kernels       55s  bench_ipot.py and bench_masked_losses.py at their target cases
#   sweep         35s  warps / block sizes of the IPOT and cross-entropy kernels, 132 vs 133 pairs
#   e2e-base      50s  bench_e2e.py, base, every provider (fast_graphs: static shapes, CUDA graphs)
#   e2e-large     50s  the same for large
#   budget        35s  tokens/s of `fast` base at three token budgets
#   convergence   85s  200 steps of base, fast paths in bf16 against reference paths in fp32
#   finetune      35s  bench_finetune.py, base: VQA and NLVR2 steps and evaluation, ours vs authors
#   retrieval     25s  bench_retrieval.py, base: full-evaluation pairs/s, the hard-negative step
set -uo pipefail

out=${1:?usage: gpu_suite.sh OUT_DIR [--dry-run]}
dry=0
[[ ${2:-} == --dry-run ]] && dry=1
mkdir -p "$out"
out=$(cd "$out" && pwd)
phases="$out/phases.tsv"
printf 'phase\tbox_s\tseconds\texit\n' >"$phases"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # the interpreter that has torch (the GPU image's python3)

# phase NAME BOX_SECONDS COMMAND...: run COMMAND with its output in OUT_DIR/NAME.log, killed at
# the box; record its time and exit status; never stop the suite.
phase() {
  local name=$1 box=$2
  shift 2
  local start=$SECONDS rc
  echo "== $name (box ${box}s): $*"
  timeout --kill-after=10 "$box" "$@" >"$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$box" "$((SECONDS - start))" "$rc" >>"$phases"
  if ((rc == 124 || rc == 137)); then
    echo "   $name: out of time after ${box}s (log: $name.log)"
  elif ((rc != 0)); then
    echo "   $name: exit $rc (last lines of $name.log:)"
    tail -n 5 "$out/$name.log" | sed 's/^/     /'
  else
    echo "   $name: ok in $((SECONDS - start))s"
  fi
  return 0
}

# setup [--check]: install the carried wheels and build the extension (--check: neither, only
# report what is there; the dry run's form, which must not touch the environment).
setup() {
  if [[ ${1:-} != --check ]]; then
    if [[ -d .whl ]] && ! $py -c 'import deepspeed, webdataset' 2>/dev/null; then
      $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
    fi
    $py -m pip install -q --no-build-isolation --no-deps -e . || return 1
  fi
  $py - <<'EOF'
import importlib.metadata as md
import torch
for name in ("torch", "triton", "deepspeed", "webdataset", "flash-attn", "transformers"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} (not installed)")
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
from uniter_fast.data.collate import extension_loaded, extension_error
print("C++ extension:", "loaded" if extension_loaded() else extension_error())
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  return 0
}

# Wheels installed with --target land in /tmp/site; the repo itself is importable as well.
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

# pytest-xdist spreads the compiled-kernel tests over the cores (each variant compiles once).
xdist=()
$py -c 'import xdist' 2>/dev/null && xdist=(-n 8)

if ((dry)); then
  # The same phases at smoke sizes on the CPU: the suite's plumbing (every script, every flag,
  # the summary) is exercised by tests/test_gpu_suite.py so that it cannot rot between GPUs.
  dev=(--device cpu)
  phase setup 120 bash -c "py=$py; $(declare -f setup); setup --check"
  phase tests 120 $py -m pytest -q -p no:cacheprovider --junitxml="$out/gpu-tests.xml" \
    tests/test_kernels_ipot.py -k "empty_batch or kernel_fits"
  phase kernels 120 bash -c "$py benchmarks/bench_ipot.py ${dev[*]} --quick --providers triton reference --out '$out' && \
    $py benchmarks/bench_masked_losses.py ${dev[*]} --quick --losses mrc --out '$out'"
  phase sweep 120 $py benchmarks/sweep_kernels.py "${dev[@]}" --quick --out "$out"
  phase e2e-base 180 $py benchmarks/bench_e2e.py "${dev[@]}" --quick --models tiny \
    --providers fast fast_graphs plain --out "$out"
  phase e2e-large 120 $py benchmarks/bench_e2e.py "${dev[@]}" --quick --models tiny \
    --providers fast --out "$out"
  phase budget 120 $py benchmarks/bench_e2e.py "${dev[@]}" --quick --models tiny \
    --providers fast --tokens-per-batch 512 --out "$out/budget-512.json"
  phase convergence 240 $py benchmarks/convergence.py "${dev[@]}" --quick --out "$out"
  phase finetune 120 $py benchmarks/bench_finetune.py "${dev[@]}" --quick --models tiny --out "$out"
  phase retrieval 120 $py benchmarks/bench_retrieval.py "${dev[@]}" --quick --out "$out"
else
  phase setup 45 bash -c "py=$py; $(declare -f setup); setup"
  phase tests 90 $py -m pytest -q -p no:cacheprovider "${xdist[@]}" \
    --junitxml="$out/gpu-tests.xml" tests/test_kernels_ipot.py tests/test_kernels_losses.py \
    tests/test_step.py tests/test_static.py tests/test_attention.py tests/test_handover.py \
    tests/test_pipeline.py -m "gpu or not slow"
  phase kernels 55 bash -c "$py benchmarks/bench_ipot.py --batch-sizes 256 --hidden-sizes 1024 --out '$out' && \
    $py benchmarks/bench_masked_losses.py --out '$out'"
  phase sweep 35 $py benchmarks/sweep_kernels.py --out "$out"
  phase e2e-base 50 $py benchmarks/bench_e2e.py --models base --steps 5 --warmup 2 --out "$out"
  phase e2e-large 50 $py benchmarks/bench_e2e.py --models large --steps 5 --warmup 2 --out "$out"
  phase budget 35 bash -c "for t in 4096 8192 16384; do $py benchmarks/bench_e2e.py \
    --models base --providers fast --tokens-per-batch \$t --steps 5 --warmup 2 \
    --out '$out/budget-'\$t'.json' || exit 1; done"
  phase convergence 85 $py benchmarks/convergence.py --steps 200 --tokens-per-batch 2048 \
    --out "$out" --work "$out/convergence-runs"
  rm -rf "$out/convergence-runs/"*/run/checkpoints
  phase finetune 35 $py benchmarks/bench_finetune.py --models base --steps 3 --warmup 1 \
    --batches 2 --out "$out"
  phase retrieval 25 $py benchmarks/bench_retrieval.py --models base --images 200 \
    --eval-texts 8 --steps 1 --rounds 2 --out "$out"
fi
$py benchmarks/gpu_summary.py "$out" && cat "$out/SUMMARY.md"
