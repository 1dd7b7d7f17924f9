#!/bin/bash
# On the development machine (PyPI reachable), before a GPU lease: stage what the GPU machine
# lacks under build/gpu-in/ (ignored by git; the device call carries it):
#   llama-src.tar.gz  llama-cpp-python 0.3.36's sdist, stripped to the vendored llama.cpp
#                     sources a CUDA build needs (~7.8 MB)
#   whl/              llama-cpp-python's Python code as a wheel without native libraries
#                     (device.sh points it at the CUDA build with LLAMA_CPP_LIB_PATH), and
#                     the pure-Python wheels the GPU image lacks (gguf, prompt-toolkit,
#                     wcwidth, diskcache; starlette and uvicorn for `qwenrun serve`)
#   STAGED            what was staged, from which commit, when
# The project itself is not copied: the device call sends the working tree as it is.
# usage: benchmarks/gpu/prepare.sh        (~35 s; prints the staged size, must stay < 64 MiB)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
IN=$ROOT/build/gpu-in
VER=0.3.36
PY=${PYTHON:-python3}

git -C "$ROOT" check-ignore -q build/gpu-in || {
  echo "build/gpu-in is not ignored by git: it would travel twice (check .gitignore)" >&2
  exit 1
}
rm -rf "$IN"
mkdir -p "$IN/whl"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

echo "== llama-cpp-python $VER source"
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$W/sdist"
mkdir -p "$W/strip"
tar xzf "$W/sdist/llama_cpp_python-$VER.tar.gz" -C "$W/strip" --exclude='*/.git' \
  --exclude="*/vendor/llama.cpp/"{models,docs,tests,benches,examples,media,gguf-py,conversion} \
  --exclude="*/vendor/llama.cpp/tools/"{ui,server} --exclude="llama_cpp_python-$VER/examples"
tar czf "$IN/llama-src.tar.gz" -C "$W/strip" "llama_cpp_python-$VER"

echo "== llama-cpp-python $VER without native libraries"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
  "$PY" -m pip wheel -q --no-deps "$W/strip/llama_cpp_python-$VER" -w "$IN/whl"

echo "== wheels the GPU image lacks (Python 3.12 there)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$IN/whl" \
  gguf==0.19.0 prompt-toolkit==3.0.52 wcwidth==0.7.0 diskcache==5.6.3 \
  starlette==1.10.0 uvicorn==0.54.0

{
  echo "staged $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo "commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "uncommitted files $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)"
  (cd "$IN" && ls -l whl/ llama-src.tar.gz)
} >"$IN/STAGED"

staged=$(du -sb "$IN" | cut -f1)
tree=$(cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } |
  xargs -0 du -cb 2>/dev/null | awk 'END {print $1}')
echo "== staged $IN: $((staged / 1024)) KiB; working tree that travels: $((tree / 1024)) KiB"
ls -l "$IN" "$IN/whl"
total=$((staged + tree))
if [ "$total" -ge $((60 * 1024 * 1024)) ]; then
  echo "too big: $((total / 1048576)) MiB of the 64 MiB a device call may carry" >&2
  exit 1
fi
echo "ok: $((total / 1048576)) MiB of the 64 MiB a device call may carry"
