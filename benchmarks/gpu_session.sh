#!/usr/bin/env bash
# One GPU session's checks, run from the repository root on a CUDA machine that has torch, timm, pandas and
# scikit-learn but nothing else of ours: wheels of the rest in .whl/, hymenoptera in .gpu/hymenoptera.
# Writes its logs to ${OUT:-/tmp/gpu_out}. Usage: bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "no editable install: using PYTHONPATH"
export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, albumentations, pydantic; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 150 python3 benchmarks/bench_gpu.py --repeats 2 --steps 8 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | tail -12
if [ -d .gpu/hymenoptera ]; then
  for amp in off bf16; do
    start=$(date +%s.%N)
    timeout 150 python3 -m finetune train full_finetune --data .gpu/hymenoptera --out /tmp/runs/hym-$amp --epochs 10 \
      --set model.pretrained=false --set train.device=cuda --set train.amp=$amp --set data.num_workers=8 \
      --set train.channels_last=$([ $amp = bf16 ] && echo true || echo false) > "$OUT/e2e_$amp.log" 2>&1
    echo "e2e amp=$amp rc=$? wall=$(python3 -c "import time; print(round(time.time()-$start,1))") s" | tee -a "$OUT/gpu.txt"
    tail -4 "$OUT/e2e_$amp.log"
  done
fi
