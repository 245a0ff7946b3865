#!/usr/bin/env bash
# The GPU path, checked end to end on one GPU node in about 10 minutes (docs/cluster.md, "A first
# GPU run"). Run it from the repository root after `make install-gpu`, with the Hugging Face hub
# reachable (or the paper students in $RAYDISTILL_CACHE_DIR) and the data mirror in
# $RAYDISTILL_DATA_DIR:
#
#   bash benchmarks/gpu_smoke.sh [OUT]          # OUT: outputs/gpu-smoke
#
# 1. versions and nvidia-smi
# 2. llama-3.2-1b, 64 GSM8K rows, ZeRO-3 bf16 over 2 workers (1 with one GPU), checkpoints every
#    2 steps: the train state (precision, checkpointing, attention, optimizer), the run at its last
#    step (4) and every step's loss finite. The losses are printed, not asserted to fall: 4 cosine
#    steps over 4 different batches need not lower the loss
# 3. one forward/backward at the longest MATH training rows for bloom-3b, gemma-2b, llama-3.2-3b:
#    measured peak memory beside raydistill.memory's estimate (benchmarks/memory.py)
# 4. raydistill eval --gpu --limit 32 of the model from 2 with vLLM and with HF generate, compared
#
# Every step prints what it measured; `set -e` stops at the first failure. OUT/summary.json
# collects the figures. `raydistill train` and `eval` write their result JSON to a file (--json),
# read from there: their stdout, kept in OUT/*.log, interleaves Ray's and vLLM's log lines.
set -euo pipefail
OUT=${1:-outputs/gpu-smoke}
PY=${PY:-.venv/bin/python}
RD=${RD:-.venv/bin/raydistill}
export LITELLM_LOCAL_MODEL_COST_MAP=True
mkdir -p "$OUT"
step() { echo; echo "== $(date +%T) $*"; }

step "1/4 versions and GPUs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'EOF' | tee "$OUT/versions.json"
import importlib.metadata as m, json, torch
names = ["ray", "vllm", "torch", "transformers", "deepspeed", "peft", "raydistill"]
info = {n: m.version(n) for n in names}
info.update(cuda=torch.version.cuda, gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(0),
            bf16=torch.cuda.is_bf16_supported())
print(json.dumps(info))
EOF
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
WORKERS=$(( GPUS >= 2 ? 2 : 1 ))

step "2/4 ZeRO-3 bf16 training of llama-3.2-1b on 64 rows, $WORKERS worker(s)"
"$PY" - "$OUT/gsm8k64.parquet" <<'EOF'
import sys, pyarrow.parquet as pq
from raydistill.datasets import load_train
pq.write_table(load_train("gsm8k", "chatgpt", level=1).slice(0, 64), sys.argv[1])
EOF
"$RD" train --student llama-3.2-1b --data "$OUT/gsm8k64.parquet" --out "$OUT/train" --name llama1b-z3 \
    --set use_gpu=true --set num_workers="$WORKERS" --set zero_stage=3 --set global_batch_size=16 \
    --set micro_batch_size=4 --set epochs=1 --set checkpoint_every_steps=2 --set cutoff_len=2048 \
    --download-to "$OUT/model" --json "$OUT/train.json" | tee "$OUT/train.log"
MODEL=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['model_path'])" "$OUT/train.json")
"$PY" - "$MODEL" "$OUT/train.json" <<'EOF'
import json, math, sys
state = json.load(open(f"{sys.argv[1]}/train_state.json"))
result = json.load(open(sys.argv[2]))
losses = [p["loss"] for p in state["history"]]
print(json.dumps({k: state[k] for k in ("precision", "gradient_checkpointing", "attn_implementation", "deepspeed")}))
print("losses", [round(x, 3) for x in losses])
assert state["precision"] == "bf16" and state["gradient_checkpointing"], "GPU defaults did not apply"
assert state["deepspeed"]["accelerator"] == "cuda", state["deepspeed"]
assert state["final"] and state["step"] == state["steps"] == result["steps"] == len(losses) == 4, \
    f"the run stopped at step {state['step']} of {state['steps']} ({len(losses)} losses)"
assert all(math.isfinite(x) and x > 0 for x in losses + [result["final_loss"]]), f"a loss is not finite: {losses}"
EOF

step "3/4 peak memory at the longest MATH rows vs the estimate"
"$PY" benchmarks/memory.py --device cuda --task math --students bloom-3b gemma-2b llama-3.2-3b \
    --micro-batch-size 4 --out "$OUT/memory.json"

step "4/4 raydistill eval --gpu --limit 32: vLLM vs HF generate"
for engine in vllm hf; do
    "$RD" eval --model "$MODEL" --student llama-3.2-1b --task gsm8k --limit 32 --gpu --engine "$engine" \
        --out-dir "$OUT/eval-$engine" --json "$OUT/eval-$engine.json" | tee "$OUT/eval-$engine.log"
done
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.json"
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
out = Path(sys.argv[1])
runs = {e: json.loads((out / f"eval-{e}.json").read_text())[0] for e in ("vllm", "hf")}  # one task
tables = {e: {r["question_id"]: r for r in pq.read_table(runs[e]["predictions_path"]).to_pylist()} for e in runs}
same = sum(tables["vllm"][q]["generation"] == tables["hf"][q]["generation"] for q in tables["hf"])
summary = {"engines": {e: {k: runs[e][k] for k in ("engine", "accuracy", "n", "truncation_rate")} for e in runs},
           "identical_generations": f"{same}/{len(tables['hf'])}",
           "memory": json.loads((out / "memory.json").read_text())}
print(json.dumps(summary, indent=1))
assert runs["vllm"]["engine"] == "vllm" and runs["hf"]["engine"] == "hf"
EOF
step "done: $OUT/summary.json"
