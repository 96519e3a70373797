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
# The whole-model atlas in the fast mode (issue 33: every layer's every unit, target under 10 minutes;
# ReLU6 layers before their clamp, so that head's and pool's units get pictures too),
# then the fast mode against the exact one on a sample of units
units=$(python -c "import deepvis_repro as dv; b = dv.load_backend(); print('[' + ','.join(l + ':all' for l in b.layers if l != 'prob') + ']')")
start=$SECONDS
deepvis-optimize "units=$units" "atlas.dir=$out/atlas" optimize.fast=true optimize.pre_activation=true \
  optimize.batch_size=256 device=cuda \
  "hydra.run.dir=$out/run" 2>&1 | tail -2
echo "whole atlas of the embedded model, fast mode, pre_activation, batches of 256: $((SECONDS - start)) s" | tee "$out/atlas.txt"
python "$here/bench_atlas_fast.py" --device cuda | tee "$out/atlas_fast.txt"
