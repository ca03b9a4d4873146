#!/usr/bin/env bash
# The one command that measures everything that needs a GPU (at most ~8 minutes on one H100):
# installs the wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh) and mmpt itself, then runs
# scripts/gpu_check.py: pytest -m gpu, the attention benchmark (op level and the 0.5B-shaped
# Qwen2: xformers vs flex vs SDPA packed vs HF sdpa/flash_attention_2 vs padded SDPA) and
# bench_train for CLIP ViT-B/16, MAE ViT-B/16 and the so400m + 0.5B VLM (configs/bench/).
# Each result lands in $OUT/<step>.json as soon as it exists; a failing step is recorded and
# the others still run. With --smoke: tiny sizes, no installs, any machine (a default test).
#   device run (carry .whl):  scripts/gpu_check.sh
#   here:                     OUT=/tmp/gc scripts/gpu_check.sh --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if [ "${1:-}" != "--smoke" ]; then
  SITE=/tmp/mmpt_site
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || echo "gpu_check.sh: wheel install failed" >&2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    CUDART12="$SITE/nvidia/cuda_runtime/lib"  # libcudart.so.12 for xformers' extension
    [ -d "$CUDART12" ] && export LD_LIBRARY_PATH="$CUDART12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    echo "gpu_check.sh: no .whl/*.whl (run scripts/fetch_gpu_wheels.sh, carry .whl)" >&2
  fi
  # mmpt itself, editable (models/ -> mmpt.models), without touching the image's packages
  "$PY" -c "import mmpt.models" 2>/dev/null ||
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
    echo "gpu_check.sh: installing mmpt failed" >&2
  "$PY" - <<'PYEOF' >"$OUT/env.txt" 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
from mmpt.models.attention import resolve_backend, unusable_reason
dev = torch.device("cuda")
for b in ("xformers", "flex", "sdpa"):
    print(b, "usable" if unusable_reason(b, dev) is None else unusable_reason(b, dev))
print("auto ->", resolve_backend("auto", dev))
PYEOF
fi
"$PY" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
