#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (a few minutes on one H200):
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. the CUDA tests (every registered method CUDA vs CPU, the pipeline, linalg, the
#    transformers LLaVA path), 2. the speed table of every method on CUDA,
# 3. PivotMerge and TIES on every input family on CUDA, 4. the 16 x 8192 scale test.
# Needs the package importable (pip install -e . or PYTHONPATH) and pytest.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc; } 2>&1 | tee "$out/gpu.txt"
timeout 200 $py -m pytest -q -p no:cacheprovider -c /dev/null --rootdir . -m cuda -rs \
  tests/methods/test_cuda_every_method.py tests/test_pipeline.py tests/test_linalg.py \
  tests/evaluation/test_llava_hf.py 2>&1 | tee "$out/cuda_tests.txt" | tail -25
timeout 150 $py benchmarks/merge_speed.py --device cuda --no-mergekit --json "$out/speed_cuda.json" 2>&1 | tail -22
timeout 150 $py benchmarks/merge_speed.py --device cuda --family all --methods pivotmerge,ties --no-mergekit \
  --runs 3 --json "$out/families_cuda.json" 2>&1 | tail -14
timeout 100 $py benchmarks/merge_speed.py --device cuda --experts 16 --width 8192 --repeat 2 \
  --methods linear,pivotmerge --no-mergekit --json "$out/scale_cuda.json" 2>&1 | tail -8
