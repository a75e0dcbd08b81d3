#!/usr/bin/env bash
# GPU figures in under 8 minutes on one GPU (issue 18): a bf16 NPO + BalDRO-DV fit of a random ~1B Llama under
# FSDP1 (FSDPStrategy, one device) and under ModelParallelStrategy (FSDP2, with one in-training evaluation), the
# step-time benchmark with model FLOPs utilisation, and the evaluation benchmark (new vs current evaluator).
#
#   bash experiments/benchmarks/gpu_check.sh [OUT]          # default OUT: runs/gpu_check
#   DRY_RUN=1 bash experiments/benchmarks/gpu_check.sh OUT  # CPU: a tiny model, every step but the FSDP1 fit,
#                                                           # whose config is only resolved (FSDP1 needs a GPU)
#
# Run from anywhere; it works in the repository root and needs the package importable by $PYTHON (default python)
# and data/tofu_embedded (tracked in git). Everything it writes goes under OUT: the model, each step's log and
# JSON, and summary.txt with the card, the fits' times, the MFU table and the evaluation ratios (copy those into
# the README's Speed section).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/gpu_check}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$SECONDS

say() { echo "[$((SECONDS - START)) s] $*" | tee -a "$SUMMARY"; }

# Each step is bounded, so that the whole check ends within its budget even when a step hangs.
step() {
    local name=$1 limit=$2
    shift 2
    say "$name: $*"
    local began=$SECONDS
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        say "$name: done in $((SECONDS - began)) s"
    else
        say "$name: FAILED (exit $?) after $((SECONDS - began)) s; see $OUT/$name.log"
        tail -n 20 "$OUT/$name.log" | tee -a "$SUMMARY"
        return 1
    fi
}

# Not a shipped experiment (experiments/combinations.yaml): the fits' overrides are written here, next to the results.
cat > "$OUT/gpu_check.yaml" <<'YAML'
# The GPU check's fit, written by experiments/benchmarks/gpu_check.sh; composed after tofu/defaults.yaml,
# methods/npo.yaml and objectives/dv.yaml (and, for FSDP1, before tofu/fsdp1.yaml): the TOFU NPO + BalDRO-DV
# recipe (bf16 weights) on the embedded benchmark's files, one GPU, a few steps, a live frozen reference, no
# checkpoints. The script names the model (--model.init_args.model, a random ~1B Llama) and the strategy.
trainer:
  devices: 1
  max_epochs: 1
  max_steps: 12
  # One batch per step, so that step 12 comes within the first epoch (25 batches of 4 forget rows).
  accumulate_grad_batches: 1
  enable_checkpointing: false
  logger: false
  # One evaluation at the last step, on 16 rows per split: the in-training path (sharded under
  # ModelParallelStrategy, generating with synced_gpus) on a GPU. tofu/fsdp1.yaml replaces this list.
  callbacks:
  - class_path: baldro_lightning.evaluation.callbacks.TofuEvaluation
    init_args:
      every_epoch: false
      every_n_steps: 12
      on_start: false
      curves: false
      criterion: rouge
      settings:
        limit: 16
        max_new_tokens: 32
        batch_size: 16
model:
  init_args:
    reference: live
data:
  init_args:
    benchmark: data/tofu_embedded
    batch_size: 4
    max_length: 256
YAML
NPO_DV=(--config experiments/tofu/defaults.yaml --config experiments/methods/npo.yaml
        --config experiments/objectives/dv.yaml --config "$OUT/gpu_check.yaml")
if [[ $DRY_RUN == 1 ]]; then
    ACCELERATOR=cpu
    SIZE=(--hidden-size 64 --num-hidden-layers 2 --intermediate-size 128 --num-attention-heads 4)
    STEP_TIME=(--steps 2 --warmup 1 --rounds 1 --batch-size 2)
    EVAL=(--limit 2 --max_new_tokens 8 --repeats 1)
else
    ACCELERATOR=gpu
    # ~1.03B parameters: 20 layers of 2048 x (4 x 2048 + 3 x 5632) plus a 2048-token vocabulary.
    SIZE=(--hidden-size 2048 --num-hidden-layers 20 --intermediate-size 5632 --num-attention-heads 16)
    STEP_TIME=(--steps 6 --warmup 2 --rounds 2 --batch-size 8)
    EVAL=(--limit 24 --max_new_tokens 64 --repeats 3)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"
fi
MODEL="$OUT/llama_random"
say "device: $ACCELERATOR; $($PYTHON -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

step model 120 "$PYTHON" -m baldro_lightning embedded-models --data data/tofu_embedded --out "$MODEL" \
    --max-position-embeddings 512 "${SIZE[@]}"

FIT=(--model.init_args.model="$MODEL" --trainer.accelerator="$ACCELERATOR")
if [[ $DRY_RUN == 1 ]]; then
    step fit_fsdp1_config 120 "$PYTHON" -m baldro_lightning fit "${NPO_DV[@]}" --config experiments/tofu/fsdp1.yaml \
        "${FIT[@]}" --trainer.devices=1 --trainer.callbacks=[] --trainer.default_root_dir="$OUT/fit_fsdp1" \
        --print_config
else
    step fit_fsdp1 150 "$PYTHON" -m baldro_lightning fit "${NPO_DV[@]}" --config experiments/tofu/fsdp1.yaml \
        "${FIT[@]}" --trainer.devices=1 --trainer.callbacks=[] --trainer.default_root_dir="$OUT/fit_fsdp1"
fi
step fit_fsdp2 180 "$PYTHON" -m baldro_lightning fit "${NPO_DV[@]}" "${FIT[@]}" \
    --trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy \
    --trainer.strategy.data_parallel_size=1 --trainer.strategy.tensor_parallel_size=1 \
    --trainer.default_root_dir="$OUT/fit_fsdp2"

step step_time 150 "$PYTHON" experiments/benchmarks/step_time.py --model "$MODEL" --benchmark data/tofu_embedded \
    --accelerator "$ACCELERATOR" --precision bf16-true --torch-dtype bfloat16 --max-length 256 \
    --variants npo npo_dv npo_cached --no-memory "${STEP_TIME[@]}" --out "$OUT/step_time.json"
grep -A 4 "^variant" "$OUT/step_time.log" | tee -a "$SUMMARY"
tail -n 1 "$OUT/step_time.log" | tee -a "$SUMMARY"

# fp32 weights: the two evaluators' values are compared within 1e-5, which bf16 rounding would not meet.
step eval 150 "$PYTHON" experiments/benchmarks/eval_throughput.py --model "$MODEL" --benchmark data/tofu_embedded \
    --dtype float32 --paths new current "${EVAL[@]}" --out "$OUT/eval.json"
grep -A 3 "^path" "$OUT/eval.log" | tee -a "$SUMMARY"
grep "^new vs" "$OUT/eval.log" | tee -a "$SUMMARY"
say "total $((SECONDS - START)) s"
