#!/usr/bin/env bash
# Every benchmark on a CUDA GPU, one after the other, for the README's GPU column (about 8 minutes
# on a fresh machine; needs Lucent for the first: pip install torch-lucent kornia kornia-rs --no-deps).
#   bash benchmarks/gpu.sh [OUT]     # figures also as JSON / text in OUT (default gpu-bench/)
set -euo pipefail
out=${1:-gpu-bench}
mkdir -p "$out"
here=$(dirname "$0")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python "$here/bench_optimize.py" --device cuda --steps 100 --json "$out/optimize.json" | tee "$out/optimize.txt"
python "$here/bench_mine.py" --device cuda --no-memory --images 2000 --batch-size 128 --workers 8 | tee "$out/mine.txt"
SDL_VIDEODRIVER=dummy python "$here/bench_live.py" --device cuda --seconds 8 --no-atlas | tee "$out/live.txt"
python "$here/bench_compile.py" --device cuda --steps 50 | tee "$out/compile.txt"
SDL_VIDEODRIVER=dummy python "$here/bench_vit.py" --device cuda --seconds 8 | tee "$out/vit.txt"
