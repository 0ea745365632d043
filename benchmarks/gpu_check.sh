#!/usr/bin/env bash
# One GPU check in under 8 minutes that needs nothing from outside the machine, all it measures in one JSON file:
#   0. bundle           (with --bundle DIR) pip install --no-index --no-deps --target <tmp> DIR/*.whl, then that
#                       folder goes first on PYTHONPATH: the wheels of benchmarks/gpu_wheels.sh
#   1. environment      python, torch, CUDA, transformers, trl, datasets, hydra, deepspeed... versions
#   2. correctness      benchmarks/gpu_correctness.py: sampler parity, fused == two-model, prefix sharing, tiny
#                       models, float32 and bfloat16
#   3. sampler_135m     benchmarks/sampler_throughput.py, batch 64, bf16: plain, two-model and fused sampling
#   4. sampler_7b       the same on the Llama-2-7B shape (goal for both: fused >= 0.85 x plain tokens/s)
#   5. eval_throughput  benchmarks/eval_throughput.py: prefix-shared vs mixed evaluation sampling, bf16
#   6. detox_text       synthetic training text (640 texts of 150-200 words)
#   7. detox_model      a random model of the 135M shape, saved with its in-process tokenizer
#   8. detox            20 steps of recipes/detox.py on it under accelerate_configs/zero2.yaml, bf16 ("missing"
#                       when deepspeed does not import)
# Models are random-initialised from benchmarks/model_configs/ (throughput needs shapes, not weights), tokenizers
# are trained in-process and texts synthetic: no download, no data folder. On a GPU, every step records the
# peak of the GPU memory in use (nvidia-smi); the throughput results also carry torch's peak allocation.
#
# On the GPU machine (no network; the checkout sent with .whl/ carried), one line, writing $OUT/gpu_check.json:
#   PYTHON=python3 bash benchmarks/gpu_check.sh --bundle .whl --out "$OUT/gpu_check.json"
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/x.json   # the same steps on CPU, tiny shapes, float32
#
# Every step runs under `timeout` (all within --budget-s seconds, default 450, dry run 900); its status, exit
# code and wall time are recorded even when it fails, and the next step still runs. Logs go to <out>_logs/
# beside the JSON, run outputs (the installed bundle, models, checkpoints) to a temporary folder removed at the
# end. Exit status 0 when every step is ok. PYTHON (default: .venv/bin/python of this checkout, else python3)
# picks the interpreter; this checkout goes first on PYTHONPATH, so it needs no install.
set -euo pipefail

usage() { sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

OUT=gpu_check.json
DRY_RUN=0
BUDGET_S=
BUNDLE=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --budget-s) BUDGET_S="$2"; shift 2 ;;
    --bundle) BUNDLE="$(realpath -- "$2")"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

OUT="$(realpath -m -- "$OUT")"  # relative to the caller's directory, before moving to the checkout
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
REPORT=("$PYTHON" "$REPO/benchmarks/gpu_check_report.py")
LOGS="${OUT%.json}_logs"
RUNS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$RUNS"' EXIT
mkdir -p "$(dirname "$OUT")" "$LOGS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# transformers >= 5.24 swaps in kernels from the hub when it loads a checkpoint; they would need a download (and
# the `kernels` package), so the layers run as torch implements them.
export USE_HUB_KERNELS=0
# unidetox reads the shared data folder from this variable only (the recipes need it set): the one beside the checkout.
export UNIDETOX_DATA_DIR="${UNIDETOX_DATA_DIR:-$(realpath -m "$REPO/../shared/data")}"
export PYTHONPATH="$REPO${BUNDLE:+:$RUNS/site}${PYTHONPATH:+:$PYTHONPATH}"
MIN_STEP_S=20  # a step given less than this is skipped rather than started to be killed
START=$(date +%s)
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"

if (( DRY_RUN )); then
  MODE=dry-run DEVICE=cpu DTYPE=float32 BUDGET_S="${BUDGET_S:-900}"
  # DeepSpeed's CPU accelerator compiles its shared-memory op in the first detox run of a fresh install (minutes
  # on a busy CPU, cached in ~/.cache/torch_extensions); its CUDA accelerator has no such op.
  DETOX_TIMEOUT_S=400
  # One thread: on a shared CPU, OpenMP threads spinning against other processes make tiny runs 10x slower.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # The shipped shapes shrunk to 2 layers of width 288 (divisible by every shape's head count), 8k tokens.
  SHAPE=(--override num_hidden_layers=2 --override hidden_size=288 --override intermediate_size=288
         --override head_dim=16 --override vocab_size=8192)
  SAMPLER_ARGS=(--batch-size 2 --new-tokens 4 --repeats 1)
  EVAL_ARGS=(--num-prompts 2 --num-samples 2 --max-new-tokens 4 --repeats 1)
  TEXT_ARGS=(--num-texts 16 --min-words 20 --max-words 40)
  # DeepSpeed runs ZeRO-2 on its CPU accelerator: the same launcher and config, one process, float32.
  DETOX_LAUNCH=(--config_file recipes/accelerate_configs/zero2.yaml --num_processes 1 --mixed_precision no)
  DETOX_ARGS=(trainer=embedded_lora trainer.max_steps=2 trainer.save_steps=2 trainer.max_length=32 trainer.logging_steps=1
              trainer.per_device_train_batch_size=2 data.max_samples=8)
  DETOX_NOTE="launcher=zero2.yaml with 1 process and float32 on DeepSpeed's CPU accelerator (no CUDA here)"
else
  MODE=gpu DEVICE=cuda DTYPE=bfloat16 BUDGET_S="${BUDGET_S:-450}" DETOX_TIMEOUT_S=200
  SHAPE=()
  SAMPLER_ARGS=(--batch-size 64 --new-tokens 64 --repeats 3)
  EVAL_ARGS=(--num-prompts 32 --num-samples 25 --repeats 2)
  TEXT_ARGS=(--num-texts 640 --min-words 150 --max-words 200)  # about the authors' 256-token distilled texts
  DETOX_LAUNCH=(--config_file recipes/accelerate_configs/zero2.yaml --num_processes 1)
  DETOX_ARGS=(trainer=embedded_lora trainer.max_steps=20 trainer.save_steps=20 +trainer.bf16=true)
  DETOX_NOTE="launcher=zero2.yaml with 1 process, bf16"
fi
GPU_MEMORY=0
(( ! DRY_RUN )) && command -v nvidia-smi >/dev/null && GPU_MEMORY=1

"${REPORT[@]}" init --out "$OUT" --mode "$MODE" --budget-s "$BUDGET_S" --logs "$LOGS" \
  --note "device=$DEVICE" --note "dtype=$DTYPE" --note "python=$PYTHON" --note "bundle=${BUNDLE:-none}" \
  --note "omp_num_threads=${OMP_NUM_THREADS:-default}" --note "use_hub_kernels=$USE_HUB_KERNELS"

# record_missing NAME REASON: a step that cannot run here, recorded as such.
record_missing() {
  echo "== $1: $2"
  "${REPORT[@]}" step --out "$OUT" --name "$1" --status missing --note "reason=$2"
}

# run_step NAME TIMEOUT_S RESULT_JSON [--note KEY=VALUE | --expect GLOB]... -- COMMAND...: run COMMAND under
# `timeout` (capped by what is left of the budget), log it to $LOGS/NAME.log and record the step; RESULT_JSON
# ("": none) is the file the command writes, whose content goes into the record; an --expect GLOB that matches
# no file fails the step. On a GPU, nvidia-smi reads the memory in use every 250 ms meanwhile.
run_step() {
  local name=$1 limit=$2 result=$3 options=()
  shift 3
  while [[ $1 != -- ]]; do options+=("$1" "$2"); shift 2; done
  shift
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < MIN_STEP_S )); then
    echo "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
    "${REPORT[@]}" step --out "$OUT" --name "$name" --status skipped \
      --note "reason=budget of ${BUDGET_S}s spent" ${options[@]+"${options[@]}"}
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local started ended rc=0 watcher=
  if (( GPU_MEMORY )); then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$LOGS/$name.gpu_memory" 2>/dev/null &
    watcher=$!
    options+=(--memory-log "$LOGS/$name.gpu_memory")
  fi
  started=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  ended=$(date +%s.%N)
  if [[ -n $watcher ]]; then
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
  fi
  local result_args=()
  [[ -n $result ]] && result_args=(--result "$result")
  "${REPORT[@]}" step --out "$OUT" --name "$name" --exit-code "$rc" --started "$started" --ended "$ended" \
    --timeout-s "$limit" --command "$*" --log "$LOGS/$name.log" ${result_args[@]+"${result_args[@]}"} \
    ${options[@]+"${options[@]}"}
  echo "   exit $rc after $(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')s"
}

if [[ -n $BUNDLE ]]; then
  run_step bundle 120 "" -- "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$RUNS/site" \
    "$BUNDLE"/*.whl
fi

run_step environment 60 "$RUNS/environment.json" -- "$PYTHON" -c '
import importlib.metadata, json, sys
import torch, transformers
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "num_threads": torch.get_num_threads(),
        "transformers_path": transformers.__file__}
for name in ("transformers", "huggingface_hub", "tokenizers", "accelerate", "peft", "trl", "datasets",
             "hydra-core", "omegaconf", "deepspeed", "pyarrow", "pandas", "numpy", "safetensors"):
    try:
        info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        info[name] = None
if torch.cuda.is_available():
    info["device_name"] = torch.cuda.get_device_name(0)
    info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
json.dump(info, open(sys.argv[1], "w"), indent=2)
' "$RUNS/environment.json"

run_step correctness 120 "$RUNS/correctness.json" -- "$PYTHON" benchmarks/gpu_correctness.py \
  --device "$DEVICE" --json "$RUNS/correctness.json"

for shape in smollm2-135m llama2-7b; do
  name="sampler_${shape#*-}"
  run_step "$name" 150 "$RUNS/$name.json" -- "$PYTHON" benchmarks/sampler_throughput.py --random-init \
    --model "$shape" ${SHAPE[@]+"${SHAPE[@]}"} --device "$DEVICE" --dtype "$DTYPE" --modes plain,sampler,fused \
    "${SAMPLER_ARGS[@]}" --json "$RUNS/$name.json"
done

run_step eval_throughput 120 "$RUNS/eval_throughput.json" -- "$PYTHON" benchmarks/eval_throughput.py \
  --random-init --models smollm2-135m,gemma3-270m ${SHAPE[@]+"${SHAPE[@]}"} --modes mixed,shared \
  --device "$DEVICE" --dtype "$DTYPE" "${EVAL_ARGS[@]}" --json "$RUNS/eval_throughput.json"

# The detox recipe loads the random 135M-shaped model and its tokenizer from a folder like any checkpoint.
run_step detox_text 60 "" --expect "$RUNS/texts.csv" -- "$PYTHON" benchmarks/random_models.py texts \
  --out "$RUNS/texts.csv" "${TEXT_ARGS[@]}"
run_step detox_model 90 "" --expect "$RUNS/model/config.json" -- "$PYTHON" benchmarks/random_models.py save \
  --config smollm2-135m ${SHAPE[@]+"${SHAPE[@]}"} --out "$RUNS/model"

# ZeRO optimizer states in the checkpoint prove that DeepSpeed, not plain accelerate, ran the training.
if "$PYTHON" -c 'import deepspeed' >"$LOGS/deepspeed_import.log" 2>&1; then
  run_step detox "$DETOX_TIMEOUT_S" "$RUNS/detox/train_summary.json" --note "$DETOX_NOTE" \
    --expect "$RUNS/detox/checkpoint-*/global_step*/zero_pp_rank_0_*optim_states.pt" -- \
    "$PYTHON" -m accelerate.commands.launch "${DETOX_LAUNCH[@]}" --main_process_port "$PORT" recipes/detox.py \
    model.name_or_path="$RUNS/model" data=authors_reference data.path="$RUNS/texts.csv" eval.enabled=false \
    output_dir="$RUNS/detox" "${DETOX_ARGS[@]}"
else
  record_missing detox "deepspeed does not import (see $LOGS/deepspeed_import.log)"
fi

status=0
"${REPORT[@]}" summary --out "$OUT" || status=$?
echo "JSON: $OUT"
exit "$status"
