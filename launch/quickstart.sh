#!/usr/bin/env bash
# The whole pipeline on a built-in corpus, on CPU or on all GPUs of this node:
#
#   bash launch/quickstart.sh [key=value ...]      # overrides go to the trainer
#
# 1. prepares the Python standard library's sources (real text on every machine, no download)
#    with a SentencePiece BPE tokenizer trained on them      -> data/stdlib/
# 2. trains the `debug` MoE preset with DeepSpeed ZeRO-3, expert parallelism over 2 ranks,
#    activation checkpointing and bf16                        -> runs/quickstart/
# 3. evaluates (loss, and one downstream score on the tiny lm-eval task tests/evaluation/tasks/pycode_tiny),
#    checkpoints, writes TensorBoard logs, exports a transformers GptOss folder
# 4. prints a generated sample and where everything is.
#
# Running it again resumes the run (or, once finished, just exports and samples again); it never
# overwrites a different run. Environment knobs (used by the end-to-end test): DATA_DIR, RUN_DIR,
# CORPUS (prepare --input specs, default "stdlib:"), VOCAB_SIZE, NPROC.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DATA_DIR=${DATA_DIR:-data/stdlib}
RUN_DIR=${RUN_DIR:-runs/quickstart}
CORPUS=${CORPUS:-stdlib:}
VOCAB_SIZE=${VOCAB_SIZE:-4096}
# DeepSpeed JIT-builds its CPU comm op once; keep it with the checkout rather than in ~/.cache.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.torch_extensions}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

GPUS=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || echo 0)
EP_ARGS=()
if [[ "$GPUS" == 1 ]]; then
    EP_ARGS=(parallel.expert_parallel_size=1)  # one GPU: nothing to split the experts over
fi

echo "== 1/4 prepare: $CORPUS -> $DATA_DIR"
# shellcheck disable=SC2086  # CORPUS may hold several input specs
python -m pipeline.prepare --input $CORPUS --output "$DATA_DIR" --train-tokenizer bpe \
    --vocab-size "$VOCAB_SIZE" --tokenizer-sample-bytes 4000000 --workers 2
python -m pipeline.prepare --verify "$DATA_DIR"

echo "== 2/4 train -> $RUN_DIR"
bash launch/single_node.sh launch/configs/quickstart.yaml run_dir="$RUN_DIR" "data.train=[$DATA_DIR]" \
    "${EP_ARGS[@]}" "$@"

echo "== 3/4 export -> $RUN_DIR/export"
python -m pipeline.export --run-dir "$RUN_DIR" --output "$RUN_DIR/export"

echo "== 4/4 sample"
python -m pipeline.generate --model "$RUN_DIR/export" --prompt "def " --max-new-tokens 80 --temperature 0.7 \
    | tee "$RUN_DIR/sample.txt"

cat <<DONE

Done. Where everything is:
  prepared data   $DATA_DIR  (manifest.json, tokenizer/, .bin/.idx shards)
  run             $RUN_DIR   (config.yaml, ds_config.json, metrics.jsonl)
  downstream      $RUN_DIR/downstream  (lm-eval result JSON per evaluated step; the score is the "downstream step" line above)
  checkpoints     $RUN_DIR/checkpoints  (latest -> $(cat "$RUN_DIR/checkpoints/latest"))
  exported model  $RUN_DIR/export  (GptOssForCausalLM.from_pretrained loads it)
  sample          $RUN_DIR/sample.txt
Watch training:   tensorboard --logdir $RUN_DIR/tensorboard
DONE
