#!/usr/bin/env bash
# Fill .whl/ with the wheels scripts/gpu_check.sh installs on the GPU machine, which has torch
# 2.11+cu130, torchvision, torchaudio, timm, lightning and transformers but cannot download.
# Run here, where pip can reach an index, before a device session; then carry .whl:
#   scripts/fetch_gpu_wheels.sh            # -> .whl/*.whl (gitignored; tens of MB)
# Only packages missing there, without dependencies (--no-deps), one version each, for
# CPython 3.12 on manylinux x86_64 (GPU_PYTHON / GPU_PLATFORMS override). xformers' CUDA
# extension is built against libcudart.so.12: a cu130 build from the PyTorch index is tried
# first; the PyPI wheel comes with nvidia-cuda-runtime-cu12 (libcudart.so.12), and
# gpu_check.sh records whether xformers can run either way (mmpt falls back to flex/sdpa).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-.whl}"
PYVER="${GPU_PYTHON:-3.12}"
PLATFORMS="${GPU_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done
fetch() {  # pip download NAME==VERSION ... for the GPU machine's Python and platform
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${platform_args[@]}" -d "$DEST" "$@"
}
# mmpt's dependencies the GPU image lacks, and theirs
fetch "webdataset==1.0.2" "braceexpand==0.1.7" \
  "jsonargparse==4.53.0" "docstring-parser==0.18.0" "typeshed-client==2.15.0" \
  "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.5"
# xformers: the cu130 build when the PyTorch index is reachable, else PyPI's + libcudart 12
if ! fetch --index-url https://download.pytorch.org/whl/cu130 "xformers==0.0.35" 2>/dev/null; then
  fetch "xformers==0.0.35" "nvidia-cuda-runtime-cu12==12.8.90"
fi
ls -l "$DEST"
du -sh "$DEST"
