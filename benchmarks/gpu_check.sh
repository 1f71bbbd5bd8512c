#!/usr/bin/env bash
# Every GPU check in one run, sized for a short loan of one GPU (about 10 minutes on an
# H100 with 16 CPUs): the tests marked `gpu`, then the clip stage and the trainer.
#
#   bash benchmarks/gpu_check.sh [OUT]      # results: OUT (default benchmarks/results/gpu)
#
# Each step has its own time limit and the script goes on when one fails, so a slow or
# broken step costs its own figures only. Results are JSON files named after the step.
# The limits add up to 540 s, under the device tool's 600 s a command.
set -u
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export RAY_USAGE_STATS_ENABLED=0 NO_ALBUMENTATIONS_UPDATE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
workers=$(( $(nproc) - 1 ))

step() {  # step NAME SECONDS COMMAND...: run it, keep its output, note how it ended
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $?" | tee -a "$out/steps.txt"
  tail -n 25 "$out/$name.log"
}

step tests 100 python -m pytest -q -m gpu -p no:cacheprovider tests/test_clip_gpu.py \
  tests/test_trainer.py -s
# The clip stage, ViT-B-32: GPU decoding (auto on CUDA) against Pillow decoding.
step clip_b32_gpu_decode 110 python benchmarks/bench_clip.py --images 30000 --engine ray \
  --device cuda --decode gpu --batch-size 512 --out "$out/clip_b32_gpu_decode.json"
step clip_b32_cpu_decode 60 python benchmarks/bench_clip.py --images 12000 --engine ray \
  --device cuda --decode cpu --batch-size 512 --reference 0 \
  --out "$out/clip_b32_cpu_decode.json"
step clip_l14_gpu_decode 80 python benchmarks/bench_clip.py --images 6000 --engine ray \
  --device cuda --decode gpu --model ViT-L-14 --batch-size 256 --reference 512 \
  --out "$out/clip_l14_gpu_decode.json"
# The trainer, ViT-B-32 at DataComp's download size: GPU decoding (auto on CUDA) against
# open_clip_train; then the workers decoding with Pillow's draft instead.
step train_b32 130 python benchmarks/bench_train.py --model ViT-B-32 --device cuda \
  --batch-size 256 --samples 30720 --workers "$workers" --image-size 683 --open-clip-train \
  --out "$out/train_b32.json"
step train_b32_draft 60 python benchmarks/bench_train.py --model ViT-B-32 --device cuda \
  --batch-size 256 --samples 20480 --workers "$workers" --image-size 683 --jpeg-draft \
  --decode cpu \
  --out "$out/train_b32_draft.json"
