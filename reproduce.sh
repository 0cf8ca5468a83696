#!/usr/bin/env bash
# Reproduce STAR and ADORE end to end (Zhan et al., SIGIR 2021), one stage after the other:
#
#   preprocess -> warm-up -> Inbatch-Neg, Rand-Neg -> mine hard negatives -> STAR -> encode + rank
#   -> ADORE on each of Inbatch-Neg / Rand-Neg / STAR -> ADORE inference -> evaluation, table, curves
#
# Usage:  bash reproduce.sh [TASK]        TASK = sample (default) | sample-doc | passage | doc
#                                         | released-passage | released-doc | beir
#
#   sample      the bundled passage sample (generated offline by `python -m sample_data`), small settings:
#               about 5 minutes on a 2-core CPU.
#   sample-doc  the bundled document sample; the warm-up learns from the sample's BM25 train run, as the real
#               doc warm-up does from msmarco-doctrain-top100.
#   passage     MS MARCO passage (bash download_data.sh passage first; bash download_data.sh warmup puts the ANCE
#               warm-up checkpoint in data/passage/warmup).  The paper's settings.  Needs a GPU (README: time,
#               memory, disk).
#   doc         MS MARCO documents (bash download_data.sh doc); the warm-up starts from a STAR passage
#               model (WARMUP_INIT) trained on the official BM25 top-100 negatives (DRhard issue #18).
#   released-passage, released-doc
#               evaluate the released models (bash download_data.sh passage|doc, then
#               bash download_data.sh models passage|doc): preprocess (shared with the passage / doc task), the
#               corpus encoded once per document encoder (Inbatch-Neg, Rand-Neg, STAR; each ADORE model ranks
#               with the embeddings of the model it was trained from, as in the paper), dev, DL19 and DL20 (when
#               downloaded) ranked with each model present, and the table of our figures beside the published
#               ones (ROOT/released_eval/results; a row more than 0.002 away is flagged), and the top-k overlap
#               with the released rank files when downloaded (download_data.sh runs).  Outputs in
#               ROOT/released_eval/evaluate/KEY.  GPU time and disk: docs/released-models.md.
#   beir        your own collection in the BEIR layout (BEIR_DIR: corpus.jsonl, queries.jsonl, qrels/train.tsv and
#               qrels/dev.tsv and/or test.tsv) from a pretrained encoder (INIT, e.g. a sentence-transformers
#               folder): INIT zero-shot, Inbatch-Neg, Rand-Neg and STAR from INIT (STAR's negatives mined by INIT,
#               reusing its corpus encoding), ADORE on each; nDCG@10, R@100, MRR@10 of dev and test.
#               Example: BEIR_DIR=my_collection INIT=model_folder bash reproduce.sh beir
#               (docs/own-collection.md: the defaults and why, measured tables and times).
#
# Every stage prints a banner and its wall time, and writes ROOT/.done/STAGE when it succeeded; a later run
# skips finished stages (delete the marker, or the whole ROOT/.done, to redo them after changing a setting).
# An interrupted training resumes from its last checkpoint.  ROOT is DATA/sample/passage, DATA/sample/doc,
# DATA/passage, DATA/doc or (beir) DATA/beir/<name of BEIR_DIR>, unless set.
#
# Environment knobs (defaults: sample | real tasks):
#   DATA=data               where the data and every output go
#   PYTHON=python           interpreter (of the environment the project is installed in)
#   DEVICE=auto             auto: CUDA when available; cpu: force the CPU (--no_cuda everywhere)
#   THREADS=1 | (unset)     torch/OpenMP/MKL threads.  One thread on the small CPU sample: OpenMP threads that
#                           spin-wait on a busy 2-core machine made training ~10x slower
#   FAISS_GPUS=             GPU ids for faiss search/mining, e.g. "0 1 2" (sharded); empty: CPU faiss
#   FP16=1 on CUDA          STAR-type training with fp16 autocast + gradient checkpointing (real tasks)
#   STEPS=300 | 50000       optimizer steps of Inbatch-Neg, Rand-Neg and STAR (real: the 100-epoch schedule is
#                           kept and the run stops at STEPS, as the authors stopped theirs around 50k)
#   BATCH=64 | 256          their batch size;  LR=1e-3 | 1e-4 (Lamb);  LR_WARMUP=10 | 1000 steps
#   SAVE_STEPS=60 | 5000    checkpoint interval (also the points of the dev-MRR curves)
#   WARMUP_TRAIN_STEPS=132 | doc: 10000 steps of the warm-up training (sample: in-batch negatives from the
#                           random init, AdamW 1e-3; doc: STAR loss with BM25 negatives)
#   WARMUP_LR=1e-3 | 1e-4   learning rate of the warm-up training (sample: AdamW; doc: Lamb)
#   WARMUP_INIT=            doc warm-up initialisation (doc: data/passage/train/star; sample-doc: the init model)
#   BASELINE_INIT=          initialisation of Inbatch-Neg and Rand-Neg (default: the warm-up model)
#   TOPK=20 | 200           hard negatives mined per training query
#   ADORE_EPOCHS=2 | 6      ADORE epochs (the original default is 6; its README: one epoch already helps)
#   ADORE_STEPS=0           if > 0: ADORE optimizer steps (overrides the epochs)
#   ADORE_LR=1e-4 | 5e-6    ADORE_BATCH=32    ADORE_WARMUP=10 | 2000    ADORE_SAVE_STEPS=35 | (epoch ends)
#   METRIC_CUT=200 | doc: 10   ADORE's depth cut (passage: README; doc: not published, JPQ's value)
#   CURVES=all | adore      which checkpoints results_table.py evaluates on dev for the curves (none: skip)
#   SAMPLE_SEED=13          seed of the generated sample
#   TOKENIZER=DATA/roberta-base   real tasks: folder with the roberta-base vocab.json + merges.txt
#   RELEASED_DIR=DATA/{passage,doc}/released   released-* tasks: the model folders (download_data.sh models)
#   SCORE_SCALE=1           γ inside every loss, softplus(γ·(s_neg − s_pos)); 1 is the paper's loss
#
# The beir task's knobs and defaults (for a pretrained sentence-transformers model on a small collection; the
# common ones above apply too, e.g. THREADS, DEVICE, CURVES (default: adore with a dev split, else none)):
#   BEIR_DIR, INIT          the collection and the initial model (required)
#   ROOT=DATA/beir/NAME     where it writes
#   DOC_LEN=256 QUERY_LEN=DOC_LEN   token lengths: the model's max_seq_length for both, as sentence-transformers
#                           encodes (all-MiniLM-L6-v2: 256; batches are padded to their longest row only)
#   EPOCHS=2 BATCH=32 LR=2e-5 LR_WARMUP=5   Inbatch-Neg, Rand-Neg and STAR: AdamW, as a sentence-transformers
#                           fine-tuning of such a model
#   SCORE_SCALE=20          the cosine scores of an L2-normalising encoder span [−1, 1] (docs/own-collection.md)
#   TOPK=30                 negatives mined by INIT per train query (STAR samples one per step from them)
#   ADORE_EPOCHS=2 ADORE_LR=2e-5 ADORE_BATCH=32 ADORE_WARMUP=5 METRIC_CUT=10 ADORE_NEG_TOPK=200
set -euo pipefail
cd "$(dirname "$0")"

TASK=${1:-sample}
case $TASK in
  sample|sample-doc|passage|doc|beir) ;;
  released-passage|released-doc) ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: bash reproduce.sh [sample|sample-doc|passage|doc|released-passage|released-doc|beir]" >&2; exit 2 ;;
esac

# ------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------
DATA=${DATA:-data}
QUERY_LEN_KNOB=${QUERY_LEN:-}    # beir: the QUERY_LEN knob (the other tasks fix their lengths below)
PY=${PYTHON:-python}
DEVICE=${DEVICE:-auto}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

case $TASK in
  sample|sample-doc) SAMPLE=1; ROOT=$DATA/sample/${TASK#sample-}; [[ $TASK == sample ]] && ROOT=$DATA/sample/passage ;;
  beir) SAMPLE=0; ROOT=${ROOT:-$DATA/beir/$(basename "${BEIR_DIR:-collection}")} ;;
  *) SAMPLE=0; ROOT=$DATA/$TASK ;;
esac
case $TASK in
  sample|passage|beir) KIND=passage ;;
  *) KIND=doc ;;
esac
if [[ $TASK == released-* ]]; then   # the released models, evaluated on the task's data folder
  KIND=${TASK#released-}; ROOT=$DATA/$KIND
  RELEASED_DIR=${RELEASED_DIR:-$DATA/$KIND/released}
fi

if [[ $TASK == beir ]]; then
  THREADS=${THREADS-}
  EPOCHS=${EPOCHS:-2}; BATCH=${BATCH:-32}; LR=${LR:-2e-5}; LR_WARMUP=${LR_WARMUP:-5}
  TOPK=${TOPK:-30}; SCORE_SCALE=${SCORE_SCALE:-20}
  ADORE_EPOCHS=${ADORE_EPOCHS:-2}; ADORE_LR=${ADORE_LR:-2e-5}; ADORE_WARMUP=${ADORE_WARMUP:-5}
  ADORE_SAVE_STEPS=${ADORE_SAVE_STEPS:-}
  CURVES=${CURVES:-$([[ -f ${BEIR_DIR:-}/qrels/dev.tsv ]] && echo adore || echo none)}
elif [[ $SAMPLE == 1 ]]; then
  THREADS=${THREADS-1}
  STEPS=${STEPS:-300}; BATCH=${BATCH:-64}; LR=${LR:-1e-3}; LR_WARMUP=${LR_WARMUP:-10}; SAVE_STEPS=${SAVE_STEPS:-60}
  WARMUP_TRAIN_STEPS=${WARMUP_TRAIN_STEPS:-132}; WARMUP_LR=${WARMUP_LR:-1e-3}
  WARMUP_INIT=${WARMUP_INIT:-$DATA/sample/init_model}
  TOPK=${TOPK:-20}
  ADORE_EPOCHS=${ADORE_EPOCHS:-2}; ADORE_LR=${ADORE_LR:-1e-4}; ADORE_WARMUP=${ADORE_WARMUP:-10}
  ADORE_SAVE_STEPS=${ADORE_SAVE_STEPS:-35}
  CURVES=${CURVES:-all}
  TOKENIZER=$DATA/sample/tokenizer
else
  THREADS=${THREADS-}
  STEPS=${STEPS:-50000}; BATCH=${BATCH:-256}; LR=${LR:-1e-4}; LR_WARMUP=${LR_WARMUP:-1000}; SAVE_STEPS=${SAVE_STEPS:-5000}
  WARMUP_TRAIN_STEPS=${WARMUP_TRAIN_STEPS:-10000}; WARMUP_LR=${WARMUP_LR:-1e-4}
  WARMUP_INIT=${WARMUP_INIT:-$DATA/passage/train/star}
  TOPK=${TOPK:-200}
  ADORE_EPOCHS=${ADORE_EPOCHS:-6}; ADORE_LR=${ADORE_LR:-5e-6}; ADORE_WARMUP=${ADORE_WARMUP:-2000}
  ADORE_SAVE_STEPS=${ADORE_SAVE_STEPS:-}
  CURVES=${CURVES:-adore}
  TOKENIZER=${TOKENIZER:-$DATA/roberta-base}
fi
ADORE_BATCH=${ADORE_BATCH:-32}
ADORE_NEG_TOPK=${ADORE_NEG_TOPK:-200}
ADORE_QUERY_LEN=64                 # the original's ADORE query length (beir: QUERY_LEN)
ADORE_STEPS=${ADORE_STEPS:-0}
BASELINE_INIT=${BASELINE_INIT:-}
SCORE_SCALE=${SCORE_SCALE:-1}
TRAIN_QUERY_LEN=24; QUERY_LEN=32   # the original's query lengths of STAR-type training and of inference
if [[ $TASK == beir ]]; then
  METRIC_CUT=${METRIC_CUT:-10}; DOC_LEN=${DOC_LEN:-256}; QUERY_LEN=${QUERY_LEN_KNOB:-$DOC_LEN}
  TRAIN_QUERY_LEN=$QUERY_LEN; TRAIN_DOC_LEN=$DOC_LEN; ADORE_QUERY_LEN=$QUERY_LEN
elif [[ $KIND == passage ]]; then
  METRIC_CUT=${METRIC_CUT:-200}; DOC_LEN=256; TRAIN_DOC_LEN=120
else
  METRIC_CUT=${METRIC_CUT:-10}; DOC_LEN=512; TRAIN_DOC_LEN=512
fi

if [[ -n $THREADS ]]; then
  export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
fi

PRE=$ROOT/preprocess
WARMUP=$ROOT/warmup
MINED=$ROOT/warmup_retrieve
DONE=$ROOT/.done

DEV_ARGS=()        # --no_cuda for every driver when DEVICE=cpu
[[ $DEVICE == cpu ]] && DEV_ARGS=(--no_cuda)
FAISS_ARGS=()      # star/inference, prepare_hardneg
ADORE_FAISS=()     # adore/train
if [[ -n ${FAISS_GPUS:-} ]]; then
  read -r -a gpus <<< "$FAISS_GPUS"
  FAISS_ARGS=(--faiss_gpus "${gpus[@]}")
  ADORE_FAISS=(--faiss_gpu_index "${gpus[@]}")
fi
AMP_ARGS=()        # fp16 + gradient checkpointing for STAR-type training on a GPU (real tasks)
if [[ $SAMPLE == 0 && $DEVICE != cpu && ${FP16:-1} == 1 ]] \
   && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  AMP_ARGS=(--fp16 --gradient_checkpointing)
fi

# One run per task folder (issue #22; infra/run_lock.py's lock file and record): a second reproduce.sh on ROOT
# started while one runs is refused before any stage; the kernel drops the lock when this shell and the stages it
# started have ended, however they end.
if command -v flock >/dev/null; then
  mkdir -p "$(dirname "$ROOT")"
  RUN_LOCK=$(dirname "$ROOT")/.$(basename "$ROOT").lock
  exec 9>>"$RUN_LOCK"
  if ! flock -n 9; then
    holder=$(sed -E 's/.*"pid": ([0-9]+), "host": "([^"]*)".*/pid \1 on host \2/' "$RUN_LOCK")
    echo "error: $ROOT: another run is writing here: ${holder:-unknown}; wait for it to end" >&2
    exit 2
  fi
  printf '{"pid": %d, "host": "%s", "job": null, "command": "reproduce.sh %s"}' $$ "$(hostname)" "$TASK" > "$RUN_LOCK"
fi

# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------
TOTAL_START=$SECONDS

# stage NAME FUNCTION [ARGS...]: run FUNCTION unless ROOT/.done/NAME exists; banner, wall time, marker.
stage() {
  local name=$1; shift
  if [[ -f $DONE/$name ]]; then
    echo "=== [$TASK] $name: done earlier, skipped (rm $DONE/$name to redo)"
    return 0
  fi
  echo
  echo "=== [$TASK] $name: started $(date '+%F %T')"
  local start=$SECONDS
  "$@"
  mkdir -p "$DONE"
  date -u '+%FT%TZ' > "$DONE/$name"
  echo "=== [$TASK] $name: finished in $((SECONDS - start)) s"
}

# latest_checkpoint DIR: DIR/checkpoint-<largest step> (fails with "no checkpoint-* in DIR" when there is none)
latest_checkpoint() { "$PY" -m infra.checkpoint_paths "$1"; }

# star_train OUT MODE INIT [EXTRA ARGS...]: star/train.py with the task's lengths (resumes an interrupted run)
star_train() {
  local out=$1 mode=$2 init=$3; shift 3
  "$PY" -m star.train --negative_mode "$mode" --init_path "$init" --preprocess_dir "$PRE" --output_dir "$out" \
    --resume --max_query_length "$TRAIN_QUERY_LEN" --max_doc_length "$TRAIN_DOC_LEN" --score_scale "$SCORE_SCALE" \
    "${DEV_ARGS[@]}" "${AMP_ARGS[@]}" "$@"
}

if [[ $TASK == beir ]]; then   # a pretrained encoder fine-tuned on a small collection: AdamW, a few epochs
  TRAIN_ARGS=(--optimizer_str adamw --learning_rate "$LR" --warmup_steps "$LR_WARMUP" --num_train_epochs "$EPOCHS"
              --per_device_train_batch_size "$BATCH" --logging_steps 5)
else
  # the schedule of Inbatch-Neg, Rand-Neg and STAR: the original's 100 epochs, stopped after STEPS steps
  TRAIN_ARGS=(--optimizer_str lamb --learning_rate "$LR" --warmup_steps "$LR_WARMUP" --num_train_epochs 100
              --stop_after_steps "$STEPS" --per_device_train_batch_size "$BATCH" --save_steps "$SAVE_STEPS"
              --logging_steps "$(( SAMPLE == 1 ? 5 : 50 ))")
  # the warm-up's optimisation (sample: AdamW from the random init; doc: Lamb with the task's schedule)
  if [[ $SAMPLE == 1 ]]; then
    WARMUP_ARGS=(--optimizer_str adamw --learning_rate "$WARMUP_LR" --warmup_steps 10 --logging_steps 5)
  else
    WARMUP_ARGS=(--optimizer_str lamb --learning_rate "$WARMUP_LR" --warmup_steps "$LR_WARMUP" --save_steps "$SAVE_STEPS")
  fi
  WARMUP_ARGS+=(--max_steps "$WARMUP_TRAIN_STEPS" --per_device_train_batch_size "$BATCH")
fi

# ------------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------------
generate_sample() {         # shared by sample and sample-doc: generated once per DATA folder
  if [[ -f $DATA/sample/sample_info.json ]]; then
    echo "using the sample already in $DATA/sample (delete the folder to regenerate it)"
  else
    "$PY" -m sample_data --out "$DATA/sample" --seed "${SAMPLE_SEED:-13}" --overwrite > /dev/null
  fi
}

check_dataset() {
  local file=$ROOT/dataset/collection.tsv
  [[ $KIND == doc ]] && file=$ROOT/dataset/msmarco-docs.tsv
  if [[ ! -f $file ]]; then
    echo "error: $file not found: run 'bash download_data.sh $KIND --dir $DATA' first" >&2
    return 1
  fi
  if [[ ! -f $TOKENIZER/vocab.json || ! -f $TOKENIZER/merges.txt ]]; then
    echo "error: roberta-base tokenizer files not found in $TOKENIZER (vocab.json, merges.txt):" \
         "'bash download_data.sh tokenizer --dir $DATA' fetches them, or set TOKENIZER=folder" >&2
    return 1
  fi
}

check_beir() {              # the collection and the initial model, with one clear line for what is missing
  local fail=""
  if [[ -z ${BEIR_DIR:-} || ! -f $BEIR_DIR/corpus.jsonl ]]; then
    fail="set BEIR_DIR to a collection in the BEIR layout (corpus.jsonl, queries.jsonl, qrels/*.tsv)"
  elif [[ ! -f $BEIR_DIR/qrels/train.tsv ]]; then
    fail="$BEIR_DIR has no train qrels (qrels/train.tsv): Inbatch-Neg, Rand-Neg, STAR and ADORE learn from them"
  elif [[ ! -f $BEIR_DIR/qrels/dev.tsv && ! -f $BEIR_DIR/qrels/test.tsv ]]; then
    fail="$BEIR_DIR has no qrels/dev.tsv or qrels/test.tsv to measure the models on"
  elif [[ -z ${INIT:-} || ! -f $INIT/config.json ]]; then
    fail="set INIT to the initial model's folder (config.json, weights, tokenizer files; e.g. a sentence-transformers model)"
  fi
  if [[ -n $fail ]]; then
    echo "error: $fail" >&2
    exit 2
  fi
}

link_init() {               # ROOT/warmup is INIT: it mines STAR's negatives and every trainer starts from it
  mkdir -p "$ROOT"
  ln -sfn "$(cd "$INIT" && pwd)" "$WARMUP"
}

preprocess_beir() {         # the tokenizer and lengths of INIT
  "$PY" -m preprocess --input_format beir --model_name_or_path "$INIT" --data_dir "$BEIR_DIR" --out_dir "$PRE" \
    --max_seq_length "$DOC_LEN" --max_query_length "$QUERY_LEN" --overwrite
}

preprocess() {
  "$PY" -m preprocess --data_type "$([[ $KIND == doc ]] && echo 0 || echo 1)" --model_name_or_path "$TOKENIZER" \
    --data_dir "$ROOT/dataset" --out_dir "$PRE" --max_seq_length 512 --max_query_length 64 --overwrite
}

# The warm-up model that mines STAR's hard negatives.
warmup_sample_passage() {   # Inbatch-Neg from the random init (stands in for ANCE's BM25 warm-up)
  star_train "$WARMUP" inbatch "$WARMUP_INIT" "${WARMUP_ARGS[@]}"
}

warmup_passage() {          # ANCE's checkpoint (original README's link): bash download_data.sh warmup
  if [[ ! -f $WARMUP/config.json ]]; then
    echo "error: no warm-up model in $WARMUP: run 'bash download_data.sh warmup --dir $DATA' (ANCE's passage" \
         "warm-up checkpoint, BM25 negatives, ~0.31 dev MRR@10), or extract it there yourself" \
         "(config.json + pytorch_model.bin)" >&2
    return 1
  fi
}

warmup_doc() {              # DRhard issue #18: STAR loss with BM25 top-100 negatives of the train queries
  local run=$ROOT/dataset/msmarco-doctrain-top100
  if [[ ! -f $WARMUP_INIT/config.json ]]; then
    echo "error: doc warm-up initialisation $WARMUP_INIT not found: run 'bash reproduce.sh passage' first, or" \
         "set WARMUP_INIT to a STAR passage model (e.g. the released one)" >&2
    return 1
  fi
  "$PY" -m star.prepare_hardneg --data_type doc --mode train --run_file "$run" --topk 100 \
    --preprocess_dir "$PRE" --output_dir "$ROOT/bm25_negatives" --overwrite
  star_train "$WARMUP" star "$WARMUP_INIT" --hardneg_path "$ROOT/bm25_negatives/hard.npy" "${WARMUP_ARGS[@]}"
}

baseline() {                # Inbatch-Neg (MODE inbatch) or Rand-Neg (MODE rand)
  star_train "$ROOT/train/$1" "$1" "${BASELINE_INIT:-$WARMUP}" "${TRAIN_ARGS[@]}"
}

mine() {                    # STAR's static hard negatives: the warm-up's top TOPK of every train query
  local fill=()             # beir: a query with more positives than the top TOPK + 10 leaves room for is filled
  [[ $TASK == beir ]] && fill=(--fill_random)
  "$PY" -m star.prepare_hardneg --data_type "$KIND" --mode train --model_dir "$WARMUP" --preprocess_dir "$PRE" \
    --output_dir "$MINED" --max_query_length "$QUERY_LEN" --max_doc_length "$DOC_LEN" --topk "$TOPK" --overwrite \
    "${fill[@]}" "${DEV_ARGS[@]}" "${FAISS_ARGS[@]}"
}

star() {
  star_train "$ROOT/train/star" star "$WARMUP" --hardneg_path "$MINED/hard.npy" "${TRAIN_ARGS[@]}"
}

# ranked_splits: dev, test (TREC DL 2019) and, when preprocess wrote it, test2020 (TREC DL 2020); beir: dev
# and test where the collection has them
ranked_splits() {
  if [[ $TASK == beir ]]; then
    local split
    for split in dev test; do [[ -f $PRE/$split-qrel.tsv ]] && echo "$split"; done
    return 0
  fi
  echo dev test
  if [[ -f $PRE/test2020-query.memmap ]]; then echo test2020; fi
}

# encode MODEL_DIR OUT_DIR: corpus + the ranked_splits queries with a STAR-type model, top-100 rank files
encode() {
  local split
  for split in $(ranked_splits); do
    "$PY" -m star.inference --data_type "$KIND" --mode "$split" --model_dir "$1" --preprocess_dir "$PRE" \
      --output_dir "$2" --max_query_length "$QUERY_LEN" --max_doc_length "$DOC_LEN" --overwrite \
      "${DEV_ARGS[@]}" "${FAISS_ARGS[@]}"
  done
}

adore() {                   # ADORE's query encoder from MODEL's checkpoint, against MODEL's frozen doc embeddings
  local model=$1
  local epochs=(--num_train_epochs "$ADORE_EPOCHS")
  (( ADORE_STEPS > 0 )) && epochs=(--max_steps "$ADORE_STEPS")
  local save=()
  [[ -n $ADORE_SAVE_STEPS ]] && save=(--save_steps "$ADORE_SAVE_STEPS")
  "$PY" -m adore.train --init_path "$ROOT/train/$model" --pembed_path "$ROOT/evaluate/$model/passages.memmap" \
    --preprocess_dir "$PRE" --data_type "$KIND" --metric_cut "$METRIC_CUT" \
    --model_save_dir "$ROOT/adore_train/$model" --resume --learning_rate "$ADORE_LR" \
    --per_gpu_batch_size "$ADORE_BATCH" --warmup_steps "$ADORE_WARMUP" "${epochs[@]}" "${save[@]}" \
    --max_seq_length "$ADORE_QUERY_LEN" --neg_topk "$ADORE_NEG_TOPK" --score_scale "$SCORE_SCALE" \
    --logging_steps "$(( SAMPLE == 1 ? 5 : 100 ))" "${DEV_ARGS[@]}" "${ADORE_FAISS[@]}"
}

# adore_rank MODEL_DIR OUT_DIR DOC_EMBEDDINGS: an ADORE query encoder on the ranked_splits against frozen embeddings
adore_rank() {
  local split
  for split in $(ranked_splits); do
    "$PY" -m adore.inference --model_dir "$1" --output_dir "$2" \
      --preprocess_dir "$PRE" --mode "$split" --dmemmap_path "$3" \
      --max_seq_length "$ADORE_QUERY_LEN" --overwrite "${DEV_ARGS[@]}" "${FAISS_ARGS[@]}"
  done
}

adore_inference() {         # the last ADORE checkpoint on the ranked_splits
  local model=$1 checkpoint
  checkpoint=$(latest_checkpoint "$ROOT/adore_train/$model")
  echo "ADORE($model) model: $checkpoint"
  adore_rank "$checkpoint" "$ROOT/evaluate/adore-$model" "$ROOT/evaluate/$model/passages.memmap"
}

results() {
  local curves=()
  case $CURVES in
    all) curves=(--curves inbatch rand star adore-inbatch adore-rand adore-star) ;;
    adore) curves=(--curves adore-inbatch adore-rand adore-star) ;;
    none) ;;
    *) read -r -a curves <<< "--curves $CURVES" ;;
  esac
  local task=$KIND
  [[ $TASK == beir ]] && task=beir
  "$PY" -m results_table --root "$ROOT" --task "$task" --title "$TASK" --doc_length "$DOC_LEN" \
    --query_length "$QUERY_LEN" --adore_query_length "$ADORE_QUERY_LEN" "${curves[@]}" "${DEV_ARGS[@]}"
}

# ------------------------------------------------------------------------------------------------------------
# The released models (released-passage, released-doc)
# ------------------------------------------------------------------------------------------------------------
RELEASED_EVAL=$ROOT/released_eval

# released_model KEY: true when RELEASED_DIR/KEY is a model folder; else says how to download it
released_model() {
  [[ -f $RELEASED_DIR/$1/config.json ]] && return 0
  echo "skipped $1: no model in $RELEASED_DIR/$1 (bash download_data.sh models $KIND --dir $DATA)"
  return 1
}

released_results() {        # the table beside the published figures (download_data.sh --published)
  local runs=()             # the released rank files, when downloaded (download_data.sh runs): top-k overlap
  [[ -d $RELEASED_DIR/runs ]] && runs=(--released_runs "$RELEASED_DIR/runs")
  mkdir -p "$RELEASED_EVAL"
  bash download_data.sh --published > "$RELEASED_EVAL/published.tsv"
  "$PY" -m results_table --root "$RELEASED_EVAL" --preprocess_dir "$PRE" --task "$KIND" --title "$TASK" \
    --published "$RELEASED_EVAL/published.tsv" "${runs[@]}" "${DEV_ARGS[@]}"
}

released() {
  local key ranked=0
  check_dataset
  stage preprocess preprocess
  for key in inbatch rand star; do   # a document encoder: the corpus once, then its own queries
    released_model "$key" || continue
    stage "released-encode-$key" encode "$RELEASED_DIR/$key" "$RELEASED_EVAL/evaluate/$key"
    ranked=1
  done
  for key in inbatch rand star; do   # ADORE(KEY): its query encoder against KEY's document embeddings
    released_model "adore-$key" || continue
    if [[ ! -f $RELEASED_DIR/$key/config.json ]]; then
      echo "skipped adore-$key: it ranks with the document embeddings of $key, which is missing"
      continue
    fi
    stage "released-adore-$key" adore_rank "$RELEASED_DIR/adore-$key" "$RELEASED_EVAL/evaluate/adore-$key" \
      "$RELEASED_EVAL/evaluate/$key/passages.memmap"
  done
  if (( ! ranked )); then
    echo "error: no released model in $RELEASED_DIR: run 'bash download_data.sh models $KIND --dir $DATA'" >&2
    return 1
  fi
  echo
  echo "=== [$TASK] evaluation: started $(date '+%F %T')"
  local start=$SECONDS
  released_results
  echo "=== [$TASK] evaluation: finished in $((SECONDS - start)) s"
}

# ------------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------------
echo "reproduce.sh $TASK: outputs in $ROOT (threads: ${THREADS:-default}, device: $DEVICE)"
if [[ $TASK == released-* ]]; then
  released
  echo "=== [$TASK] all stages done in $((SECONDS - TOTAL_START)) s; results in $RELEASED_EVAL/results"
  exit 0
fi
if [[ $TASK == beir ]]; then   # zero-shot first: mining reuses its corpus encoding (same model and length)
  check_beir
  stage init link_init
  stage preprocess preprocess_beir
  stage encode-warmup encode "$WARMUP" "$MINED"
  stage mine mine
  for model in inbatch rand; do
    stage "$model" baseline "$model"
  done
  stage star star
else
  if [[ $SAMPLE == 1 ]]; then
    stage sample generate_sample
  else
    check_dataset
  fi
  stage preprocess preprocess
  case $TASK in
    sample) stage warmup warmup_sample_passage ;;
    passage) warmup_passage ;;
    *) stage warmup warmup_doc ;;
  esac
  stage inbatch baseline inbatch
  stage rand baseline rand
  stage mine mine
  stage star star
  stage encode-warmup encode "$WARMUP" "$MINED"
fi
for model in inbatch rand star; do
  stage "encode-$model" encode "$ROOT/train/$model" "$ROOT/evaluate/$model"
done
for model in inbatch rand star; do
  stage "adore-$model" adore "$model"
done
for model in inbatch rand star; do
  stage "adore-inference-$model" adore_inference "$model"
done
echo
echo "=== [$TASK] evaluation: started $(date '+%F %T')"
start=$SECONDS
results
echo "=== [$TASK] evaluation: finished in $((SECONDS - start)) s"
echo "=== [$TASK] all stages done in $((SECONDS - TOTAL_START)) s; results in $ROOT/results"
