#!/usr/bin/env bash
# The wheel bundle for the GPU machine: what it lacks or has too old, downloaded here, installed there offline.
#   bash benchmarks/gpu_wheels.sh                                   # CPython 3.12 (the GPU machine) into .whl/
#   bash benchmarks/gpu_wheels.sh --python-version 3.11 --dest DIR  # the same set for another CPython (dry run)
#
# The machine (Python 3.12, torch 2.11 + CUDA, transformers 5.17, accelerate 1.15, huggingface_hub 1.33,
# tokenizers 0.23.2, safetensors 0.8, scipy, pandas, pyarrow, h5py, sentencepiece; see the device notes'
# package list) reaches no network. The pins below are the versions of this project's tested environment.
# Binary wheels are for manylinux x86-64; the two source-only packages (deepspeed, antlr4) are built here into
# pure-Python wheels (deepspeed with DS_BUILD_OPS=0: its ops compile just in time where they are used), so the
# bundle is wheels only and installs with one command:
#   python3 -m pip install --no-index --no-deps --target DIR .whl/*.whl && export PYTHONPATH=DIR
# (benchmarks/gpu_check.sh --bundle .whl runs exactly that before its steps). The total must stay under
# 40 MiB: the machine receives at most 64 MiB with the checkout. alt-profanity-check is left out: the check
# measures speed and correctness and scores no toxicity. PYTHON (default: .venv/bin/python of this checkout,
# else python3) builds the two wheels and needs torch, setuptools and wheel installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.whl"
PYTHON_VERSION=3.12
LIMIT_MIB=40
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dest) DEST="$(realpath -m -- "$2")"; shift 2 ;;
    --python-version) PYTHON_VERSION="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x $PYTHON ]] || PYTHON=python3

DOWNLOADED=(
  # transformers >= 5.24 (pyproject) and what it needs newer than the machine's: huggingface_hub 2.x (which
  # imports httpx2), regex >= 2025.10.22 (checked when transformers is imported)
  transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
  anyio==4.16.0 h11==0.16.0 idna==3.21 click==8.5.1 regex==2026.12.2 typing_extensions==4.16.0
  peft==0.21.2  # the peft tested with this transformers (the machine's is of unknown version)
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  hydra-core==1.3.8 omegaconf==2.3.1
  # deepspeed's own needs that the machine lacks
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
BUILT=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)  # source archives only: built here, pure Python

NEW="$(mktemp -d "$(dirname "$DEST")/.gpu_wheels.XXXXXX")"
trap 'rm -rf "$NEW"' EXIT
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
  --implementation cp "${PLATFORMS[@]}" -d "$NEW" "${DOWNLOADED[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$NEW" "${BUILT[@]}"
for built in "$NEW"/*.whl; do
  if [[ $built != *-py3-none-any.whl && $built != *-py2.py3-none-any.whl && $built != *cp${PYTHON_VERSION/./}* \
        && $built != *py${PYTHON_VERSION/./}-none-any.whl ]]; then
    echo "error: $built is not a wheel for CPython $PYTHON_VERSION" >&2
    exit 1
  fi
done
count=$(find "$NEW" -name '*.whl' | wc -l)
expected=$(( ${#DOWNLOADED[@]} + ${#BUILT[@]} ))
if (( count != expected )); then
  echo "error: $count wheels in $NEW for $expected pinned packages" >&2
  exit 1
fi
bytes=$(du -cb "$NEW"/*.whl | tail -1 | cut -f1)
rm -rf "$DEST"
mv "$NEW" "$DEST"
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "$count wheels for CPython $PYTHON_VERSION in $DEST: $mib MiB"
if (( bytes > LIMIT_MIB * 1048576 )); then
  echo "error: the bundle is over its ${LIMIT_MIB} MiB limit" >&2
  exit 1
fi
shown="${DEST#"$REPO"/}"  # relative to the checkout, as it lies on the GPU machine
echo "install there: python3 -m pip install --no-index --no-deps --target DIR $shown/*.whl && export PYTHONPATH=DIR"
echo "or run the check, which does so first: PYTHON=python3 bash benchmarks/gpu_check.sh --bundle $shown --out \$OUT/gpu_check.json"
