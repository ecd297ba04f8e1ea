#!/usr/bin/env bash
# One-GPU check (about 8 minutes): bf16 benchmark eager + compiled, Table 9 throughput, short bf16 training.
# Usage: bash scripts/gpu_check.sh [--device cuda|cpu] [--tiny] [--parts benchmark,table9,train]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
