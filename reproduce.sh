#!/usr/bin/env bash
# The paper's pipeline, one readable step per stage; a stage whose ".done" marker exists is skipped, so a rerun
# resumes after the last finished stage.
#
#   bash reproduce.sh sample      # the bundled sample (default): generated offline, runs on a laptop CPU
#
# Knobs (environment): ROOT (default data/sample), EPOCHS (warm-up/baseline/STAR epochs, default 3),
# ADORE_EPOCHS (default 1), BATCH (default 64), MAX_STEPS (cap per training, default -1 = no cap).
set -euo pipefail

TASK=${1:-sample}
if [[ "$TASK" != sample ]]; then
    echo "reproduce.sh: only the 'sample' task is scripted so far; see README.md for the MS MARCO commands" >&2
    exit 2
fi

ROOT=${ROOT:-data/sample}
EPOCHS=${EPOCHS:-3}
ADORE_EPOCHS=${ADORE_EPOCHS:-1}
BATCH=${BATCH:-64}
MAX_STEPS=${MAX_STEPS:--1}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}

P=$ROOT/passage
PRE=$P/preprocess
RUNS=$P/runs
EVAL=$P/evaluate
QLEN=16
DLEN=64

stage() {  # stage NAME COMMAND...: run once, then mark done
    local name=$1; shift
    local marker=$RUNS/.done-$name
    if [[ -f $marker ]]; then echo "== $name: done, skipped"; return; fi
    echo "== $name"
    local t0=$SECONDS
    "$@"
    mkdir -p "$RUNS" && touch "$marker"
    echo "== $name: $((SECONDS - t0)) s"
}

train() {  # train OUT_NAME INIT MODE [extra args]
    local out=$1 init=$2 mode=$3; shift 3
    $PY star/train.py --init_path "$init" --preprocess_dir "$PRE" --negative_mode "$mode" \
        --output_dir "$RUNS/$out" --overwrite_output_dir --per_device_train_batch_size "$BATCH" \
        --learning_rate 1e-3 --warmup_steps 10 --num_train_epochs "$EPOCHS" --max_steps "$MAX_STEPS" \
        --max_query_length $QLEN --max_doc_length $DLEN --logging_steps 10 --no_cuda "$@"
}

evaluate_star() {  # evaluate_star NAME MODEL_DIR: corpus + dev/test rank files
    local name=$1 model=$2
    for mode in dev test; do
        $PY star/inference.py --data_type passage --mode "$mode" --model_dir "$model" --preprocess_dir "$PRE" \
            --output_dir "$EVAL/$name" --max_query_length $QLEN --max_doc_length $DLEN --no_cuda --overwrite
    done
}

adore() {  # adore NAME START: ADORE on the start model's own document embeddings, then inference
    local name=$1 start=$2
    $PY adore/train.py --init_path "$RUNS/$start" --pembed_path "$EVAL/$start/passages.memmap" \
        --preprocess_dir "$PRE" --data_type passage --model_save_dir "$RUNS/adore-$start" --overwrite_output_dir \
        --max_seq_length $QLEN --per_gpu_batch_size 32 --learning_rate 5e-5 --warmup_steps 10 \
        --num_train_epochs "$ADORE_EPOCHS" --max_steps "$MAX_STEPS" --neg_topk 200 --logging_steps 10 --no_cuda
    local model=$RUNS/adore-$start/epoch-$ADORE_EPOCHS
    [[ -d $model ]] || model=$(ls -d "$RUNS/adore-$start"/checkpoint-* | sort -t- -k2 -n | tail -1)  # MAX_STEPS stop
    for mode in dev test; do
        $PY adore/inference.py --model_dir "$model" --output_dir "$EVAL/adore-$start" \
            --preprocess_dir "$PRE" --mode "$mode" --dmemmap_path "$EVAL/$start/passages.memmap" \
            --max_seq_length $QLEN --no_cuda --overwrite
    done
}

T0=$SECONDS
stage sample      $PY -m sample_data --out "$ROOT"
stage preprocess  $PY preprocess.py --data_type 1 --data_dir "$P/dataset" --out_dir "$PRE" \
                      --model_name_or_path "$ROOT/tokenizer" --max_seq_length $DLEN --max_query_length 24 --overwrite
stage warmup      train warmup "$ROOT/init_model" inbatch
stage inbatch     train inbatch "$RUNS/warmup" inbatch
stage rand        train rand "$RUNS/warmup" rand --rand_num 1
stage mine        $PY star/prepare_hardneg.py --data_type passage --mode train --model_dir "$RUNS/warmup" \
                      --preprocess_dir "$PRE" --output_dir "$RUNS/warmup_retrieve" --max_query_length $QLEN \
                      --max_doc_length $DLEN --topk 50 --no_cuda --overwrite
stage star        train star "$RUNS/warmup" star --hardneg_path "$RUNS/warmup_retrieve/hard.npy"
for m in inbatch rand star; do
    stage "encode-$m" evaluate_star "$m" "$RUNS/$m"
done
for m in inbatch rand star; do
    stage "adore-$m" adore "$m" "$m"
done
$PY results_table.py --eval_dir "$EVAL" --preprocess_dir "$PRE"
echo "== pipeline: $((SECONDS - T0)) s"
