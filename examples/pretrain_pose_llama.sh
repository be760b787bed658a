#!/usr/bin/env bash
# PoSE context extension of a LLaMA-style model on megatron-core.
#
# No arguments, no GPU: trains a tiny LLaMA on the bundled sample corpus on CPU with 2 gloo
# processes, PoSE from seq 256 to target 2048 with revised YaRN, for a few minutes.
# On GPU clusters the environment describes the recipe (defaults in brackets are for GPUs):
#   NNODES [1] NODE_RANK [0] MASTER_ADDR MASTER_PORT [6000] (unset on one node: --standalone)
#   GPUS_PER_NODE [all GPUs]
#   TP [1] PP [1] MODEL [llama2-7b] DATA_PATH [sample corpus] TOKENIZER_MODEL
#   LOAD (a converted or earlier checkpoint) SAVE [checkpoints/pose_<model>]
#   SEQ_LENGTH [the model's window] TARGET_LENGTH [4 x SEQ_LENGTH] ROPE_TYPE [linear]
#   ROPE_FACTOR [TARGET_LENGTH / SEQ_LENGTH] TRAIN_ITERS [1000] GLOBAL_BATCH_SIZE [64]
#   MICRO_BATCH_SIZE [1] LR [2e-5]
# Extra arguments are passed to `python -m pose_megatron.train` (they win over the above).
# The script creates no environment: on clusters it runs inside the project's container.
#
# Re-running resumes: when SAVE already holds a checkpoint it is loaded (LOAD is then ignored), and
# a finished run says so and exits 0. SIGTERM or Ctrl-C makes the workers save and exit (0 once
# saved), however long the save takes; a second Ctrl-C aborts at once. No process outlives the
# script: torchrun runs in its own process group, which is cleaned up at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

# Whole numbers only (bash arithmetic below would fail with a cryptic message on "1k").
for name in NNODES NODE_RANK MASTER_PORT GPUS_PER_NODE TP PP SEQ_LENGTH TARGET_LENGTH TRAIN_ITERS \
            GLOBAL_BATCH_SIZE MICRO_BATCH_SIZE WARMUP LOG_INTERVAL SAVE_INTERVAL EVAL_INTERVAL; do
  value=${!name:-}
  if [ -n "$value" ] && ! [[ "$value" =~ ^[0-9]+$ ]]; then
    echo "[pretrain_pose_llama] error: $name=$value must be a whole number (e.g. 1000, not 1k)" >&2
    exit 2
  fi
done

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ON_GPU=1
else
  ON_GPU=0
fi

if [ "$ON_GPU" = 1 ]; then
  GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
  MODEL=${MODEL:-llama2-7b}
  SEQ_LENGTH=${SEQ_LENGTH:-$("$PYTHON" -c "from pose_megatron.presets import MODEL_PRESETS as P; print(P['$MODEL'].max_position_embeddings)")}
  TARGET_LENGTH=${TARGET_LENGTH:-$((4 * SEQ_LENGTH))}
  ROPE_TYPE=${ROPE_TYPE:-linear}
  TRAIN_ITERS=${TRAIN_ITERS:-1000}
  GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
  MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
  LR=${LR:-2e-5}
  WARMUP=${WARMUP:-$(( TRAIN_ITERS > 100 ? 10 : TRAIN_ITERS / 10 ))}
  LOG_INTERVAL=${LOG_INTERVAL:-10}
  EXTRA=(--bf16 --save-interval "${SAVE_INTERVAL:-200}")
else
  # The CPU demo: a small model from scratch, so a higher learning rate.
  GPUS_PER_NODE=${GPUS_PER_NODE:-2}
  MODEL=${MODEL:-small}
  SEQ_LENGTH=${SEQ_LENGTH:-256}
  TARGET_LENGTH=${TARGET_LENGTH:-2048}
  ROPE_TYPE=${ROPE_TYPE:-yarn-revised}
  TRAIN_ITERS=${TRAIN_ITERS:-300}
  GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}
  MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
  LR=${LR:-1e-3}
  WARMUP=${WARMUP:-$(( TRAIN_ITERS / 10 ))}
  LOG_INTERVAL=${LOG_INTERVAL:-20}
  EXTRA=(--precision fp32 --eval-interval "${EVAL_INTERVAL:-100}" --eval-iters 4)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one core per process
fi
ROPE_FACTOR=${ROPE_FACTOR:-$("$PYTHON" -c "print($TARGET_LENGTH / $SEQ_LENGTH)")}
SAVE=${SAVE:-$ROOT/checkpoints/pose_${MODEL}}

ARGS=(
  --model "$MODEL"
  --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
  --seq-length "$SEQ_LENGTH" --pose-target-length "$TARGET_LENGTH"
  --rope-type "$ROPE_TYPE" --rope-factor "$ROPE_FACTOR"
  --rope-original-max-position-embeddings "$SEQ_LENGTH"
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
  --train-iters "$TRAIN_ITERS" --lr "$LR" --lr-warmup-iters "$WARMUP" --lr-decay-style linear
  --log-interval "$LOG_INTERVAL" --save "$SAVE"
  "${EXTRA[@]}"
)
if [ -z "${DATA_PATH:-}" ]; then
  # The bundled sample corpus (standard-library sources), built once and cached.
  { read -r DATA_PATH; read -r TOKENIZER_MODEL; } < <(
    "$PYTHON" "$ROOT/tools/build_sample_corpus.py" --print train_prefix tokenizer_model)
fi
ARGS+=(--data-path $DATA_PATH --tokenizer-model "${TOKENIZER_MODEL:?DATA_PATH needs TOKENIZER_MODEL}")
if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then
  if [ -n "${LOAD:-}" ] && [ "$LOAD" != "$SAVE" ]; then
    echo "[pretrain_pose_llama] $SAVE holds a checkpoint: resuming it (LOAD=$LOAD is not used)"
  fi
  LOAD=$SAVE
fi
if [ -n "${LOAD:-}" ]; then
  ARGS+=(--load "$LOAD")
fi

echo "[pretrain_pose_llama] $MODEL: seq $SEQ_LENGTH -> target $TARGET_LENGTH, $ROPE_TYPE x$ROPE_FACTOR," \
     "$((${NNODES:-1} * GPUS_PER_NODE)) processes ($([ "$ON_GPU" = 1 ] && echo GPU || echo CPU, gloo))"
if [ "${NNODES:-1}" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  RENDEZVOUS=(--standalone)  # one node: torchrun picks a free local port
else
  RENDEZVOUS=(--nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}"
              --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-6000}")
fi

# Every process of this run inherits this id, so the cleanup below finds them all.
export POSE_MEGATRON_LAUNCH_ID=${POSE_MEGATRON_LAUNCH_ID:-pose-$$-$RANDOM$RANDOM}
# torchrun in its own process group: a terminal's Ctrl-C reaches only this script, which passes
# signals to the workers themselves (torchrun would SIGKILL them 30 s after forwarding one, cutting
# a large save short).
setsid "$PYTHON" -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc-per-node "$GPUS_PER_NODE" \
  -m pose_megatron.train "${ARGS[@]}" "$@" &
TORCHRUN=$!
SIGNALS=0
forward() {  # $1: TERM or INT
  SIGNALS=$((SIGNALS + 1))
  if [ "$SIGNALS" = 1 ]; then
    echo "[pretrain_pose_llama] SIG$1: the workers save a checkpoint and stop (again to abort)" >&2
  fi
  pkill "-$1" -P "$TORCHRUN" 2>/dev/null || true
}
cleanup() {
  # Whatever is left: torchrun's group, and every process that inherited this run's id. Workers run
  # in sessions of their own, and a killed rank's checkpoint writer, multiprocessing manager and
  # resource tracker outlive it in theirs (holding this script's output open).
  kill -KILL -- "-$TORCHRUN" 2>/dev/null || true
  local environ pid
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}; pid=${pid%/environ}
    if [ "$pid" != $$ ] && grep -qzx "POSE_MEGATRON_LAUNCH_ID=$POSE_MEGATRON_LAUNCH_ID" "$environ" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap cleanup EXIT
STATUS=0
while true; do
  wait "$TORCHRUN" && STATUS=0 || STATUS=$?
  kill -0 "$TORCHRUN" 2>/dev/null || break  # a trapped signal interrupts wait; torchrun goes on
done
if [ "$STATUS" = 0 ]; then
  echo "[pretrain_pose_llama] checkpoint: $SAVE (latest iteration in $SAVE/latest_checkpointed_iteration.txt)"
fi
exit "$STATUS"
