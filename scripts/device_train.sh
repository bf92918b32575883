#!/usr/bin/env bash
# Train the phantom lesion network on a lent GPU machine in one call, and bring the model folder back.
#
#   bash scripts/device_train.sh prepare             # here: the wheels the GPU machine lacks, into .whl/
#   bash scripts/device_train.sh run OUT [OPTIONS]   # there: train into OUT (then copy it from $OUT)
#
# The GPU machines this project is sometimes lent (the `device` tool: one H100 or H200, 16 cores, Python
# 3.12 with CUDA PyTorch, no network) have no MONAI and no nibabel; training on phantoms needs nothing else
# of ours (SimpleITK and the file, DICOM and plotting packages are imported only when used;
# Testing/test_lazy_import.py checks it). `prepare` downloads those two wheels (about 5 MB) into .whl/
# (git-ignored) for the device tool to carry; `run` installs them into /tmp/site and runs
# `conformalseg train` with the recipe below, OPTIONS appended (a later option wins, so any default can be
# overridden). With a device call limited to 10 minutes, give `--time-limit` a little less than the call's
# timeout: the run then stops cleanly, writes OUT (the best weights so far) and keeps its checkpoint.
#
# The recipe: the shipped model v11 fine-tuned on the next unused phantom stream (1016) with the blob loss,
# in bfloat16 mixed precision (on the CPU a bf16 round gave its fp32 twin's network, benchmarks/RESULTS.md),
# 8 crops of 64 x 64 x 48 per step (the inference window; about 11x v11's voxels per step), one loader
# worker per spare core; everything else is the `--task lesion` default. A model trained this way ships
# only after it beats v11 on the test and demo phantoms as v11 was judged (benchmarks/eval_lesion_model.py
# --demo, RESULTS.md). The checkpoint beside OUT (about 20 MB) is over the device tool's 16 MiB per file
# and does not come back; the model folder does.
#
# Example device call (from the repository root here, after `prepare`):
#   run(command="bash scripts/device_train.sh run $OUT/lesion_gpu --time-limit 480", carry=[".whl"], timeout_s=570)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(monai==1.6.1 nibabel==5.4.2)  # the versions in this machine's .venv on 2026-12-05

case "${1:-}" in
prepare)
  mkdir -p .whl
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -la .whl
  ;;
run)
  out="${2:?give the output folder: bash scripts/device_train.sh run OUT [OPTIONS]}"
  shift 2
  # CONFORMALSEG_PYTHON / CONFORMALSEG_DEVICE: another interpreter (which then needs no wheels) or device,
  # e.g. this repository's .venv and cpu (Testing/test_device_train_script.py runs the recipe that way)
  python="${CONFORMALSEG_PYTHON:-python3}"
  if [ -z "${CONFORMALSEG_PYTHON:-}" ]; then
    compgen -G ".whl/*.whl" > /dev/null || { echo "no wheels in .whl/: run 'bash scripts/device_train.sh prepare' here first and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  device="${CONFORMALSEG_DEVICE:-cuda}"
  cores=$(nproc)
  workers=$((cores > 3 ? cores - 2 : 1))
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  set -x
  exec "$python" -m ConformalSegLib train --phantom-stream --phantom-seed 1016 --heldout 48 --lesion-label 6 \
    --out "$out" --init-weights Resources/models/phantom_lesion_unet_v11 --loss blob-dice-ce --lr 0.0003 \
    --epochs 40 --fg-fraction 0.5 --patch-size 64 64 48 --crop-size 64 64 48 --batch-size 8 \
    --precision bf16 --num-workers "$workers" --device "$device" --seed 17 "$@"
  ;;
*)
  echo "usage: bash scripts/device_train.sh prepare | run OUT [conformalseg train options]" >&2
  exit 2
  ;;
esac
