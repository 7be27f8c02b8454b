#!/usr/bin/env bash
# Every GPU benchmark in one short run (a lent GPU machine's minutes are few): JSON lines into $OUT (default ./var/bench).
# Most important first; each measurement has its own time limit so that one slow compile cannot eat the rest.
#   MINIMIND=path/to/minimind bash bench/gpu_session.sh
OUT=${OUT:-var/bench}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
MM=${MINIMIND:+--minimind $MINIMIND}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
train() { local limit=$1; shift; timeout "$limit" $PY bench/train_throughput.py $MM --steps 10 --warmup 3 "$@" \
          2> >(grep -v Warning >&2) | tee -a "$OUT/train.jsonl"; }
train 60 --cases dense --compile no
train 90 --cases moe --compile no
train 60 --cases sft,sft_grouped --compile no
timeout 120 $PY bench/rl_throughput.py --steps 2 | tee -a "$OUT/rl.jsonl"
train 120 --cases dense --compile yes
train 150 --cases sft,sft_grouped --compile yes --impls ours
train 120 --cases moe --compile yes --impls ours
echo done
