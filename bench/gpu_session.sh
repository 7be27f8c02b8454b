#!/usr/bin/env bash
# Every GPU training benchmark in one short run (a lent GPU machine's minutes are few): JSON lines into $OUT
# (default ./var/bench). First every compiled variant is compiled at once in parallel processes (filling the inductor
# caches), then each is timed alone, most important first, each under its own time limit.
#   MINIMIND=path/to/minimind bash bench/gpu_session.sh
#   SMALL="--hidden 64 --layers 2 --batch 4 --seq 64" bash bench/gpu_session.sh     # a smoke run of the script
OUT=${OUT:-var/bench}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
MM=${MINIMIND:+--minimind $MINIMIND}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

ours="--impls ours"; mm="--impls minimind"
compiled=(
  "--cases dense --compile yes $ours"
  "--cases dense --compile yes $mm"
  "--cases dense --compile yes $ours --compile-mode reduce-overhead"
  "--cases dense --compile yes $ours --batch 64 --accum 4"
  "--cases dense --compile yes $ours --attn sdpa --unfused"
  "--cases sft --compile yes $ours"
  "--cases moe --compile yes $ours"
)
eager=(
  "--cases dense --compile no $mm"
  "--cases sft --compile no $mm"
  "--cases dense --compile no $ours"
  "--cases moe --compile no $mm"
)
start=$(date +%s)
for v in "${compiled[@]}"; do
  TORCHINDUCTOR_COMPILE_THREADS=4 timeout "${WARM_S:-240}" $PY bench/train_throughput.py $MM $SMALL $v --steps 1 --warmup 1 \
    >/dev/null 2>>"$OUT/warm.log" &
done
wait
echo "compiled everything in $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

timed() { local limit=$1; shift; timeout "$limit" $PY bench/train_throughput.py $MM $SMALL --steps 8 --warmup 3 "$@" \
          2>>"$OUT/stderr.log" | tee -a "$OUT/train.jsonl"; }
timed 90 ${compiled[0]} --profile 1   # the kernel table goes to stderr.log
timed 60 ${eager[0]}
for v in "${compiled[@]:1}"; do timed 60 $v; done
for v in "${eager[@]:1}"; do timed 60 $v; done
echo "done in $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
