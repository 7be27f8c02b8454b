#!/usr/bin/env bash
# Every GPU training benchmark in one short run (a lent GPU machine's minutes are few): JSON lines into $OUT
# (default ./var/bench). First every compiled variant is compiled at once in parallel processes (filling the inductor
# caches), then each is timed alone, most important first, each under its own time limit; last, the engine itself
# trains MiniMind's pretraining shapes (and SFT) on the demo data with CUDA graphs, and its step events are kept.
#   MINIMIND=path/to/minimind bash bench/gpu_session.sh
# On a lent machine whose image has another transformers: carry a wheel and MiniMind's model file, then
#   pip install --no-index --no-deps --target /tmp/site .whl/transformers-5.24.0-py3-none-any.whl
#   PYTHONPATH=/tmp/site MINIMIND=.mm bash bench/gpu_session.sh   # .mm: MiniMind's model/ (with its tokenizer) and trainer/
# The whole list takes about 10 minutes on an H100: what ran by the call's time limit is in $OUT, most important first.
#   SMALL="--hidden 64 --layers 2 --batch 4 --seq 64" RL_SMALL="--hidden 64 --layers 2 --max-new 16" ENGINE_DEVICE=cpu \
#     ENGINE_MODEL='"hidden_size": 64, "num_hidden_layers": 2, ' bash bench/gpu_session.sh     # a CPU smoke run
OUT=${OUT:-var/bench}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
MM=${MINIMIND:+--minimind $MINIMIND}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

ours="--impls ours"; mm="--impls minimind"; graphs="--compile-mode reduce-overhead"
compiled=(  # the engine's fastest settings (use_compile, compile_mode reduce-overhead, compile_tuning), then without tuning
  "--cases dense --compile yes $ours $graphs --coordinate-descent"
  "--cases dense --compile yes $ours $graphs"
  "--cases moe --compile yes $ours $graphs --coordinate-descent"
  "--cases sft --compile yes $ours $graphs --coordinate-descent"
  "--cases sft_packed --compile yes $ours $graphs"
  "--cases sft_packed_flex --compile yes $ours $graphs"
  "--cases dense --compile yes $ours $graphs --coordinate-descent --batch 64 --accum 4"
)
start=$(date +%s)
for v in "${compiled[@]}"; do
  TORCHINDUCTOR_COMPILE_THREADS=4 timeout "${WARM_S:-220}" $PY bench/train_throughput.py $MM $SMALL $v --steps 1 --warmup 1 \
    >/dev/null 2>>"$OUT/warm.log" &
done
wait
echo "compiled everything in $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

timed() { local limit=$1; shift; timeout "$limit" $PY bench/train_throughput.py $MM $SMALL --warmup 3 "$@" \
          2>>"$OUT/stderr.log" | tee -a "$OUT/train.jsonl"; }
engine() {  # the engine itself (python -m training run) at MiniMind's pretraining shapes, CUDA graphs on
  local d=/tmp/engine stage=$1 data=$2 steps=$3
  mkdir -p $d && $PY -m training demo-data $d/data >/dev/null || return
  for i in $(seq 30); do cat $d/data/$data.jsonl; done > $d/$stage.jsonl
  cat > $d/$stage-spec.json <<EOF
{"stage": "$stage", "dataset": "$d/$stage.jsonl", "tokenizer": "$d/data/demo-tokenizer", "run_dir": "$d/run-$stage",
 "device": "${ENGINE_DEVICE:-cuda}", "config": {${ENGINE_MODEL:-}"use_compile": true, "compile_mode": "reduce-overhead",
 "compile_tuning": true, "max_steps": $steps,
 "log_interval": 5, "save_interval": 20, "epochs": 1}}
EOF
  timeout 100 $PY -m training run $d/$stage-spec.json > "$OUT/engine-$stage.jsonl" 2>>"$OUT/stderr.log"
  echo "engine $stage exit $?" | tee -a "$OUT/gpu.txt"; grep -h '"event": "step"' "$OUT/engine-$stage.jsonl" | tail -2
}
# most important first: what ran by the call's time limit is in $OUT (the fourth session measured max-autotune: it
# did not finish compiling in 5 minutes, and cuBLAS won the shapes it tried). Issue 27's open targets lead: dense MFU,
# packed SFT against MiniMind's SFT (>= 3x its non-pad tokens/s; the dense mask, then FlexAttention's block mask),
# GRPO rollouts against MiniMind's own rollout path (>= 5x)
timed 60 ${compiled[0]} --steps 20
timed 60 ${compiled[6]} --steps 20  # the same tokens per optimizer step in half the micro-steps: kept if it wins
timed 60 --cases sft --compile no $mm
timed 60 ${compiled[4]}  # packed SFT (the engine's default)
timed 60 ${compiled[5]}  # the same through FlexAttention's block mask (packed_attention: flex): kept if it wins
rl() { timeout "$1" $PY bench/rl_throughput.py $RL_SMALL "${@:2}" 2>>"$OUT/stderr.log" | tee -a "$OUT/rl.jsonl"; }
# GRPO rollouts at MiniMind's defaults (2 prompts x 6 x 1024 new tokens): MiniMind's own rollout path, then ours
[ -n "$MINIMIND" ] && rl 90 --impl minimind --minimind "$MINIMIND" --warmup 1 --steps 1
rl 150 --warmup 1 --steps 3
[ "${ENGINE:-1}" = 1 ] && engine sft demo-sft 40  # not yet run through the engine with CUDA graphs
[ "${ENGINE:-1}" = 1 ] && engine pretrain demo-pretrain 30
timed 60 ${compiled[1]} --steps 20
timed 60 --cases dense --compile no $mm --steps 8
timed 60 ${compiled[2]} --steps 8
timed 60 --cases sft_packed --compile no $ours
timed 60 ${compiled[3]}
timed 60 --cases distill --compile no $mm  # distillation (student and MoE teacher on packed rows) beside MiniMind's
timed 60 --cases distill_packed --compile no $ours
timeout 60 $PY bench/train_throughput.py $MM $SMALL ${compiled[0]} --steps 2 --warmup 3 --profile 1 \
  >"$OUT/profile.jsonl" 2>"$OUT/profile.txt"  # the kernel table of one optimizer step
echo "done in $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
