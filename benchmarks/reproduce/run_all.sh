#!/usr/bin/env bash
# Run every reproduction script (docs/reproduction.md). Full mode by default; pass --quick for
# the smoke mode, and any other option (--data SPEC, --threads N, --out DIR) to every script.
# Interrupted? Run the same command again: the grids resume from their journals.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
for s in claim23_pooling claim2_distribution claim4_small_models claim5_first_epoch claim7_trainable claim8_resnet20; do
    echo "== $s $*" >&2
    python "benchmarks/reproduce/$s.py" "$@"
done
