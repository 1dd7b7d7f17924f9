#!/bin/bash
# The GPU kit's one device call, from the repository root, carrying build/gpu-in (prepare.sh):
#   1. installs the staged wheels into $WORK/site (the GPU machine reaches no registry);
#   2. writes the synthetic full-size Qwen3-30B-A3B Q4_K_M (benchmarks/synthetic_model.py)
#      in the background while it
#   3. builds llama.cpp 0.3.36's vendored source for CUDA (sm_90: H100/H200; targets llama and
#      llama-fit-params; ~230 s on 16 cores), then points llama-cpp-python at it with
#      LLAMA_CPP_LIB_PATH;
#   4. runs `qwenrun doctor`, then measure.py until LIMIT seconds after the start.
# Results go to $OUT as they come (8 files: steps.log build.log measure.log results.jsonl
# summary.md plans.json fit.log failures.log), so a call cut short still returns its data.
# Resumable: everything lives in $WORK (/tmp/qr), so a second call on the still-warm machine
# skips what is installed, built, written or measured.
#
# env: LIMIT   seconds from the start after which no run starts (default 560; the call's
#              timeout_s should be LIMIT + 40)
#      BLOCKS  measure.py --blocks (default: all, in priority order)
#      CAPS, ROUNDS, SWEEP   measure.py --caps / --rounds / --sweep
#      DRY=1   a CPU machine: no nvidia-smi, no CUDA build (the installed llama-cpp-python's
#              CPU libraries through LLAMA_CPP_LIB_PATH instead), a small model,
#              dry-fit/llama-fit-params (a stand-in), measure.py --dry-run.
#              DRY_CONFIGURE=1 also tries the CUDA configure step.
#      WORK    the working folder (default /tmp/qr; /tmp/qr-dry when DRY=1)
#      PYTHON  the interpreter (default python3)
set -u -o pipefail
T0=$(date +%s)
LIMIT=${LIMIT:-560}
DRY=${DRY:-0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
IN=$ROOT/build/gpu-in
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then R=${WORK:-/tmp/qr-dry}; else R=${WORK:-/tmp/qr}; fi
OUTD=${OUT:-}
mkdir -p "$R/res"
[ -n "$OUTD" ] && mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1
export QWENRUN_HOME=$R/home

# Logs go to $OUT as they grow too: a call killed at its limit runs no trap.
LOGS=("$R/steps.log")
BLOGS=("$R/build.log")
if [ -n "$OUTD" ]; then
  LOGS+=("$OUTD/steps.log")
  BLOGS+=("$OUTD/build.log")
fi
log() { echo "[device +$(($(date +%s) - T0))s] $*" | tee -a "${LOGS[@]}"; }
sync_out() {
  [ -n "$OUTD" ] || return 0
  local f
  for f in steps.log build.log measure.log; do
    if [ -f "$R/$f" ]; then cp "$R/$f" "$OUTD/"; fi
  done
  for f in results.jsonl summary.md plans.json fit.log failures.log; do
    if [ -f "$R/res/$f" ]; then cp "$R/res/$f" "$OUTD/"; fi
  done
}
trap sync_out EXIT

log "start: $(hostname), $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB RAM, $R"
[ -d "$IN/whl" ] || { log "no $IN/whl: run benchmarks/gpu/prepare.sh and carry build/gpu-in"; exit 1; }
[ -f "$IN/STAGED" ] && sed 's/^/  staged: /' "$IN/STAGED" | head -3 | tee -a "${LOGS[@]}"
if [ "$DRY" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1 |
    tee -a "${LOGS[@]}"
  { command -v nvcc && nvcc --version | tail -1; } 2>&1 | tee -a "${LOGS[@]}"
fi
df -h /tmp | tail -1 >>"$R/steps.log"

# The CPU libraries a dry run points llama-cpp-python at: found before PYTHONPATH hides them.
if [ "$DRY" = 1 ]; then
  DRY_LIB=${DRY_LIB:-$("$PY" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__) + "/lib")')}
fi

# 1. wheels
if [ ! -f "$R/site/.done" ]; then
  log "install wheels: $(cd "$IN/whl" && echo *.whl)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$R/site" \
    "$IN"/whl/*.whl 2>&1 | tail -3 | tee -a "${LOGS[@]}"
  touch "$R/site/.done"
fi
export PYTHONPATH=$R/site:$ROOT

# 2. the model, in the background
if [ "$DRY" = 1 ]; then
  M=$R/small.gguf
  SYNTH_ARGS=(--layers 8 --experts 16 --vocab-size 8192)
else
  M=$R/q30.gguf
  SYNTH_ARGS=()
fi
SYNTH=""
if [ ! -s "$M" ]; then
  log "write $M ${SYNTH_ARGS[*]:-} (background)"
  (
    "$PY" "$ROOT/benchmarks/synthetic_model.py" "${SYNTH_ARGS[@]}" --out "$M.part" >"$R/synth.log" 2>&1 &&
      mv "$M.part" "$M"
  ) &
  SYNTH=$!
fi

# 3. the CUDA build (resumable: ninja continues where it stopped)
S=$R/src/llama_cpp_python-0.3.36/vendor/llama.cpp
B=$R/cuda
configure() {
  cmake -S "$S" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_NATIVE=ON \
    -DGGML_CUDA_FA_QUANTS=f16-f16 -DGGML_CUDA_NCCL=OFF -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF "$@" 2>&1 | tee -a "${BLOGS[@]}" >/dev/null
}
build_cuda() {
  [ -d "$S" ] || { mkdir -p "$R/src" && tar xzf "$IN/llama-src.tar.gz" -C "$R/src"; }
  if [ ! -f "$B/build.ninja" ]; then
    log "configure"
    if ! configure; then
      # cuBLAS may live only in the nvidia-cublas wheel: point CMake at it and retry once.
      local lib lt inc
      lib=$(find /usr/local /opt /usr/lib -name 'libcublas.so*' 2>/dev/null | head -1)
      lt=$(find /usr/local /opt /usr/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)
      inc=$(dirname "$(find /usr/local /opt -name cublas_v2.h 2>/dev/null | head -1)")
      log "configure failed; retry with cuBLAS ${lib:-none} ${lt:-none}, include $inc"
      tail -15 "$R/build.log"
      [ -n "$lib" ] && [ -n "$lt" ] || return 1
      dirname "$lib" >"$R/cublas_dir"
      rm -rf "$B"
      configure "-DCUDA_cublas_LIBRARY=$lib" "-DCUDA_cublasLt_LIBRARY=$lt" \
        "-DCMAKE_CUDA_FLAGS=-I$inc" "-DCMAKE_CXX_FLAGS=-I$inc" || return 1
    fi
  fi
  [ "$DRY" = 1 ] && return 0
  log "build (cmake --build, $(nproc) jobs)"
  nice -n 5 cmake --build "$B" --target llama llama-fit-params -j "$(nproc)" 2>&1 |
    tee -a "${BLOGS[@]}" >/dev/null
}
if [ "$DRY" = 1 ]; then
  if [ "${DRY_CONFIGURE:-0}" = 1 ]; then
    if build_cuda; then log "configure ok"; else log "configure failed (expected without cuBLAS)"; fi
  fi
  export LLAMA_CPP_LIB_PATH=$DRY_LIB
  BIN=$ROOT/benchmarks/gpu/dry-fit  # a stand-in llama-fit-params for the small model
else
  if ! build_cuda; then
    log "build failed"
    grep -m5 -B2 -A8 'error' "$R/build.log" | tail -60
    exit 1
  fi
  log "built: $(cd "$B/bin" && echo *)"
  if [ -f "$R/cublas_dir" ]; then
    LD_LIBRARY_PATH=$(cat "$R/cublas_dir"):${LD_LIBRARY_PATH:-}
    export LD_LIBRARY_PATH
  fi
  export LLAMA_CPP_LIB_PATH=$B/bin
  BIN=$B/bin
fi

if [ -n "$SYNTH" ]; then
  log "waiting for the model"
  wait "$SYNTH" || true
fi
cat "$R/synth.log" >>"$R/steps.log" 2>/dev/null
[ -s "$M" ] || { log "no model at $M"; tail -20 "$R/synth.log"; exit 1; }
log "model: $(ls -l "$M")"

# 4. checks, then the measurements
log "llama.cpp: $LLAMA_CPP_LIB_PATH"
OFFLOAD=$("$PY" -c 'from qwenrun.engine import native; import qwenrun.bench.runner, qwenrun.offload
print(native.supports_gpu_offload())' 2>&1 | tail -5)
log "imports ok? llama.cpp GPU offload: $OFFLOAD"
if [ "$DRY" != 1 ] && [ "$OFFLOAD" != True ]; then
  log "llama.cpp from $LLAMA_CPP_LIB_PATH cannot offload to the GPU: nothing to measure"
  exit 1
fi
log "doctor"
timeout 90 "$PY" -m qwenrun doctor 2>&1 | head -40 | tee -a "${LOGS[@]}"
sync_out
log "measure until +${LIMIT}s"
ARGS=("$M" --out "$R/res" --deadline "$((T0 + LIMIT))")
[ -n "$OUTD" ] && ARGS+=(--mirror "$OUTD")
[ -n "$BIN" ] && ARGS+=(--bin "$BIN")
[ -n "${CAPS:-}" ] && ARGS+=(--caps "$CAPS")
[ -n "${BLOCKS:-}" ] && ARGS+=(--blocks "$BLOCKS")
[ -n "${ROUNDS:-}" ] && ARGS+=(--rounds "$ROUNDS")
[ -n "${SWEEP:-}" ] && ARGS+=(--sweep "$SWEEP")
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
TEES=("$R/measure.log")
[ -n "$OUTD" ] && TEES+=("$OUTD/measure.log")
"$PY" "$ROOT/benchmarks/gpu/measure.py" "${ARGS[@]}" 2>&1 | tee -a "${TEES[@]}"
rc=$?
log "end (measure rc $rc)"
exit "$rc"
