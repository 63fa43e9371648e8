#!/bin/bash
# Issue 22 before/after, as run for this folder: the code before the data path (b7bc1dc, checked out with
# `git worktree add --detach ../before b7bc1dc`; its bench has one pass per row, so it runs three times) and main
# (three passes per row, the median), same settings, back to back on the idle machine, main's venv for both.
# Usage: bash run.sh BEFORE_WORKTREE OUT_DIR   (from the repository root)
BEFORE=${1:?the b7bc1dc worktree} OUT=$(realpath -m "${2:?output folder}")
PY=$PWD/.venv/bin/python
ARGS=(--methods mae,lut --size micro --img-size 224 --patch-size 16 --batch 32 --steps 2 --warmup 1
      --method-args '{"decoder_dim":64,"decoder_depth":1,"decoder_heads":4,"head_hidden_dim":128}'
      --data imagefolder,webdataset --data-images 512 --workers 1 --shard-workers none)
uptime
for i in 1 2 3; do
  (cd "$BEFORE" && PYTHONPATH=$PWD $PY -m benchmarks.bench "${ARGS[@]}" --out "$OUT/before_b7bc1dc_$i")
done
PYTHONPATH=$PWD $PY -m benchmarks.bench "${ARGS[@]}" --augment-on loader,device_whole,device --data-repeats 3 \
    --out "$OUT/after"
uptime
