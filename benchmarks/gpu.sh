#!/usr/bin/env bash
# Every benchmark on a CUDA GPU, one after the other, for the README's GPU column (about 20 minutes
# on an H200, most of it the whole atlas; needs Lucent for the first: pip install torch-lucent
# kornia kornia-rs decorator --no-deps; bench_live and bench_vit need PyAV, bench_atlas_fast
# EfficientNet-Lite1's package, both in the project's dependencies).
#   bash benchmarks/gpu.sh [OUT]     # figures also as JSON / text in OUT (default gpu-bench/)
#   ATLAS_SECONDS=300 bash benchmarks/gpu.sh   # the whole atlas stopped after 300 s (rerun: it resumes)
set -euo pipefail
out=${1:-gpu-bench}
mkdir -p "$out"
here=$(dirname "$0")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python "$here/bench_optimize.py" --device cuda --steps 100 --json "$out/optimize.json" | tee "$out/optimize.txt"
python "$here/bench_mine.py" --device cuda --no-memory --images 2000 --batch-size 128 --workers 8 | tee "$out/mine.txt"
SDL_VIDEODRIVER=dummy python "$here/bench_live.py" --device cuda --seconds 8 --no-atlas | tee "$out/live.txt"
python "$here/bench_compile.py" --device cuda --steps 50 | tee "$out/compile.txt"
# what a step costs as the batch grows (ops dispatched, ms): launch-bound or compute-bound
python "$here/bench_atlas_step.py" --device cuda --units 8,64,256 --numerics bf16 | tee "$out/atlas_step.txt"
SDL_VIDEODRIVER=dummy python "$here/bench_vit.py" --device cuda --seconds 8 | tee "$out/vit.txt"
# The whole-model atlas in the fast mode (issue 33: every layer's every unit, target under 10 minutes;
# ReLU6 layers before their clamp, so that head's and pool's units get pictures too; in bfloat16),
# then the fast mode against the exact one on a sample of units
units=$(python -c "import deepvis_repro as dv; b = dv.load_backend(); print('[' + ','.join(l + ':all' for l in b.layers if l != 'prob') + ']')")
# ATLAS_SECONDS=N stops it after N s as Ctrl-C would (the atlas resumes: run the script again)
start=$SECONDS
${ATLAS_SECONDS:+timeout -s INT -k 60 "$ATLAS_SECONDS"} deepvis-optimize "units=$units" "atlas.dir=$out/atlas" \
  optimize.fast=true optimize.pre_activation=true optimize.numerics=bf16 optimize.batch_size=256 device=cuda \
  "hydra.run.dir=$out/run" 2>&1 | tr '\r' '\n' | tail -2 || true
echo "whole atlas of the embedded model, fast mode, pre_activation, bf16, batches of 256: $((SECONDS - start)) s" | tee "$out/atlas.txt"
python - "$out/atlas" <<'PY' | tee -a "$out/atlas.txt"
import glob, json, os, sys
for p in sorted(glob.glob(os.path.join(sys.argv[1], "regularized_opt", "*", "results.json"))):
    d = json.load(open(p))
    print(f"  {d['layer']}: {len(d['units'])} units")
PY
python "$here/bench_atlas_fast.py" --device cuda | tee "$out/atlas_fast.txt"
