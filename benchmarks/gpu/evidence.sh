#!/usr/bin/env bash
# CIFAR-10 evidence on one NVIDIA GPU in one call (issue 24): installs bnnshift WITHOUT touching the
# machine's torch, then runs benchmarks/gpu/evidence.py (docstring there: what runs, what is written).
#   bash benchmarks/gpu/evidence.sh [ARCHIVE] [OUT_JSON] [extra evidence.py options]
#   ARCHIVE defaults to data/cifar10-jpeg.tar.gz (copy it into the git-ignored data/ folder so it
#   travels with the working tree), OUT_JSON to $OUT/gpu-evidence.json or ./gpu-evidence.json.
# On CPU: bash benchmarks/gpu/evidence.sh --tiny   (no archive needed; about a minute or two)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >&2
$PY -c "import bnnshift" 2>/dev/null || $PY -m pip install -q --no-deps -e . >&2
# bnnshift's own light dependencies, only those missing (never torch / torchvision)
for pkg in typer rich onnx onnxruntime onnxscript safetensors optuna filelock; do
  $PY -c "import $pkg" 2>/dev/null || $PY -m pip install -q --retries 0 --timeout 5 "$pkg" >&2 || echo "evidence: could not install $pkg (bring it as a wheel: docs/gpu.md)" >&2
done
if [ "${1:-}" = "--tiny" ]; then
  shift
  exec $PY benchmarks/gpu/evidence.py --device cpu --tiny --budget-s 240 --out "${OUT:-.}/gpu-evidence-tiny.json" "$@"
fi
ARCHIVE=${1:-data/cifar10-jpeg.tar.gz}; shift || true
OUTJSON=${1:-${OUT:-.}/gpu-evidence.json}; shift || true
exec $PY benchmarks/gpu/evidence.py --archive "$ARCHIVE" --out "$OUTJSON" --budget-s "${BUDGET_S:-480}" "$@"
