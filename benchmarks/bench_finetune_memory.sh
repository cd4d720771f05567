#!/bin/bash
# Mistral-7B full fine-tuning within memory on 2 GPUs (BENCHMARKS.md): AdamW on the GPU against
# DeepSpeed's CPU Adam (2 stages), and ZeRO-1 over 2 replicas of 1 stage against the plain run it
# replaces (which the memory plan refuses). Each run stops after its last step's line (the final
# checkpoint of a 7B run with AdamW state is 87 GB); per run: OUT/NAME.log and a line in OUT/summary.txt
# with the nvidia-smi peak and the last metrics.
#
#   OUT=results DATA=train.jsonl TOKENIZER=tokenizer.model bash benchmarks/bench_finetune_memory.sh
#
# RUNS picks runs (default: gpu cpuadam zero1 plain_dp); STEPS (5), PRESET (mistral-7b), DTYPE, SEQ;
# ENTRY=benchmarks/finetune_memprobe.py prints each rank's peak CUDA allocation after every step.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$OUT"
COMMON="model=random model.preset=${PRESET:-mistral-7b} model.dtype=${DTYPE:-bfloat16} data.seq_len=${SEQ:-2048} train.batch_size=8 train.steps=${STEPS:-5} data.path=$DATA data.tokenizer=$TOKENIZER export=null metrics.log_every=1 resume=null"
run() {  # name, port, timeout, overrides...
  local name=$1 port=$2 t=$3; shift 3
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > /tmp/smi_$name.txt &
  local smi=$!
  local t0=$(date +%s)
  timeout $t torchrun --nproc_per_node=2 --master_port $port ${ENTRY:-launch/finetune.py} $COMMON out_dir=/tmp/ft_$name "$@" > $OUT/$name.log 2>&1 &
  local job=$!
  # the last step's line is all we need: stop before the end-of-run checkpoint (87 GB for 7B with AdamW state)
  while kill -0 $job 2>/dev/null; do
    if grep -q "^step ${STEPS:-5}/${STEPS:-5}" $OUT/$name.log; then sleep 3; pkill -f "torchrun .*--master_port $port"; break; fi
    sleep 1
  done
  wait $job
  echo "$name rc=$? wall=$(( $(date +%s) - t0 ))s" | tee -a $OUT/summary.txt
  rm -rf /tmp/ft_$name/checkpoints
  kill $smi
  python3 - $name >> $OUT/summary.txt <<'PY'
import sys, json, collections
name = sys.argv[1]
peak = collections.defaultdict(int)
for line in open(f"/tmp/smi_{name}.txt"):
    try: i, m = (int(x) for x in line.split(","))
    except ValueError: continue
    peak[i] = max(peak[i], m)
print(f"  {name} nvidia-smi peak MiB: {dict(peak)}")
try:
    rows = [json.loads(l) for l in open(f"/tmp/ft_{name}/metrics.jsonl")]
    for r in rows[-3:]:
        print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
except FileNotFoundError:
    print("   no metrics")
PY
  grep -A3 "memory plan" $OUT/$name.log >> $OUT/summary.txt
}
want() { [[ " ${RUNS:-gpu cpuadam zero1 plain_dp} " == *" $1 "* ]]; }
want gpu && run gpu 29601 240 pipeline.stages=2 schedule=1f1b schedule.microbatches=8
want cpuadam && run cpuadam 29611 400 pipeline.stages=2 schedule=1f1b schedule.microbatches=8 train.optimizer=cpu_adam
want zero1 && run zero1 29621 240 pipeline.stages=1 pipeline.data_parallel=2 schedule=1f1b schedule.microbatches=4 train.zero=1
want plain_dp && run plain_dp 29631 120 pipeline.stages=1 pipeline.data_parallel=2 schedule=1f1b schedule.microbatches=4
cat $OUT/summary.txt
