#!/usr/bin/env bash
# Every GPU measurement of docs/gpu.md in one run (~6 minutes on one H200), written to benchmarks/results/gpu/
# (or $1): the mixed-precision check, the step cost of the four benchmark models, the whole-run wall time, the
# strategies' agreement against the machine's own noise (with and without TF32) and, last, torch_compile=True on
# the demo CNN (not yet run on a GPU). Each part has its own time limit
# and the run goes on when one fails, so one slow part does not lose the others.
#
#   bash benchmarks/run_gpu_benchmarks.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: these are the GPU benchmarks'" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia_smi.txt" 2>&1
"$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" \
    > "$OUT/versions.txt"

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), at most ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit status $? ($(date +%T))"
    tail -n 4 "$OUT/$name.log"
}

part gpu_check 120 "$PY" benchmarks/gpu_check.py --json "$OUT/gpu_check.json"
for model in resnet bert llama bert_lora; do
    part "step_cost_$model" 150 "$PY" benchmarks/step_cost.py --model "$model" --out "$OUT"
done
part wallclock 400 "$PY" benchmarks/wallclock.py --tasks cnn resnet sft --width 64 --output_dir "$OUT"
# deterministic cuBLAS needs a fixed workspace
part agreement 200 env CUBLAS_WORKSPACE_CONFIG=:4096:8 "$PY" benchmarks/gpu_agreement.py --models resnet bert
part agreement_tf32_off 120 env CUBLAS_WORKSPACE_CONFIG=:4096:8 "$PY" benchmarks/gpu_agreement.py --models resnet \
    --tf32 off
# last, so that its compilations cannot take time from the parts above: torch_compile=True against eager
part torch_compile 200 "$PY" benchmarks/torch_compile.py --tasks cnn --rounds 1 --output_dir "$OUT"
