#!/usr/bin/env bash
# GPU check, one command: the gpu-marked tests, then the core benchmark in bf16 on a random
# Llama-3.2-1B-shaped model (all three shapes and the workflow table), results under OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Needs one CUDA GPU and python3 with torch, transformers, pytest, safetensors, gguf, einops, plotly,
# pyyaml, tqdm (no internet, nothing installed, nothing downloaded). About 5 minutes on an H100;
# each step has its own time limit so the whole stays under 8 minutes.
# Writes: env.txt, gpu_tests.txt, bench_gpu.md (the tables), bench_gpu.log, summary.txt.
set -uo pipefail
if [ $# -ne 1 ]; then echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2; exit 2; fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}

{ nvidia-smi || true
  $PY -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# 1. every test module that has gpu-marked tests, gpu-marked tests only
gpu_tests=$(grep -l "mark.gpu" tests/test_*.py)
timeout 150 $PY -m pytest -q -rs -p no:cacheprovider -m gpu $gpu_tests 2>&1 | tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

# 2. the benchmark: bf16, random 1B-shaped Llama, HF comparators (TransformerLens / nnsight are not needed)
timeout 300 $PY benchmarks/bench_core.py --device cuda --dtype bfloat16 --model llama-1b --no-interop \
  --rounds 10 --threads 4 --out "$out/bench_gpu.md" 2>&1 | tee "$out/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests exit $tests_rc; benchmark exit $bench_rc (124 = time limit)" | tee "$out/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
