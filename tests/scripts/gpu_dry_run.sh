#!/usr/bin/env bash
# The GPU machine in miniature, on CPU: `benchmarks/gpu_check.sh --dry-run` in a fresh venv that holds only what
# that machine has, with the wheel bundle installed as it is there, no network and an empty model cache.
#   bash tests/scripts/gpu_dry_run.sh            # prints one closing line; exit status 0 when the check passed
#
# 1. A fresh venv (under $GPU_DRY_RUN_DIR, default .cache/gpu_dry_run/ of this checkout, git-ignored) with the
#    machine's packages at its versions where known (transformers 5.17, accelerate 1.15, huggingface_hub 1.33).
#    Two differences, forced by what installs here: torch is torch==2.13.0, the CPU wheel on this machine's disk
#    (the machine: 2.11 + CUDA), so the venv's Python is the one that wheel is for ($BASE_PYTHON, default python3:
#    3.11 here; the machine: 3.12), and the bundle is the same pins built for that Python.
# 2. benchmarks/gpu_wheels.sh builds that bundle (from PyPI and pip's cache: the last network use).
# 3. Under `unshare -n` (a network namespace with only loopback: as root, util-linux), with an empty
#    UNIDETOX_CACHE and HF_HOME: gpu_check.sh --dry-run --bundle, which installs the bundle with
#    pip install --no-index --no-deps --target and puts it first on PYTHONPATH, as on the machine.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(realpath -m -- "${GPU_DRY_RUN_DIR:-$REPO/.cache/gpu_dry_run}")"
BASE_PYTHON="${BASE_PYTHON:-python3}"
MACHINE_PACKAGES=(
  torch==2.13.0 transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 tokenizers==0.23.2
  safetensors==0.8.0 sentencepiece==0.2.2 numpy peft scipy pandas pyarrow matplotlib h5py
  # beneath those, and what deepspeed (built from the bundle) and datasets import from the machine's own set
  pyyaml regex requests tqdm filelock fsspec packaging psutil jinja2 xxhash typer httpx setuptools wheel ninja
  py-cpuinfo msgpack einops
)
started=$(date +%s)
finish() {
  local rc=$1 what=$2
  local verdict=OK
  (( rc == 0 )) || verdict="FAILED (exit $rc)"
  echo "gpu dry run: $verdict after $(( $(date +%s) - started ))s: $what"
  exit "$rc"
}

if ! command -v unshare >/dev/null; then
  finish 1 "unshare (util-linux) is missing: it cuts the network off; install util-linux"
fi
if ! unshare -n true 2>/dev/null; then
  finish 1 "unshare -n is refused: a network namespace needs root (or CAP_SYS_ADMIN)"
fi

# The folder is replaced whole: only one that a dry run made (it holds .gpu_dry_run) or an empty one.
if [[ -n "$(ls -A "$WORK" 2>/dev/null)" && ! -e $WORK/.gpu_dry_run ]]; then
  finish 1 "$WORK holds files of something else: set GPU_DRY_RUN_DIR to a new or empty folder"
fi
rm -rf "$WORK"
mkdir -p "$WORK"
touch "$WORK/.gpu_dry_run"
echo "== venv of the GPU machine's packages in $WORK/venv"
"$BASE_PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q "${MACHINE_PACKAGES[@]}" || finish $? "installing the machine's packages failed"
PY_VERSION="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

echo "== the bundle for CPython $PY_VERSION in $WORK/whl"
PYTHON="$PY" bash "$REPO/benchmarks/gpu_wheels.sh" --python-version "$PY_VERSION" --dest "$WORK/whl" \
  || finish $? "benchmarks/gpu_wheels.sh failed"

echo "== benchmarks/gpu_check.sh --dry-run --bundle, no network"
mkdir -p "$WORK/empty_cache" "$WORK/hf_home"
rc=0
unshare -n env -u PYTHONPATH UNIDETOX_CACHE="$WORK/empty_cache" HF_HOME="$WORK/hf_home" PYTHON="$PY" \
  bash -c 'ip link set lo up && exec bash "$1"/benchmarks/gpu_check.sh --dry-run --bundle "$2"/whl \
             --out "$2"/gpu_check.json' _ "$REPO" "$WORK" || rc=$?
finish "$rc" "$WORK/gpu_check.json"
