#!/usr/bin/env bash
# Download MS MARCO (passage and document ranking), the TREC DL 2019 and 2020 test queries and qrels and the
# roberta-base tokenizer files into DIR/{passage,doc}/dataset and DIR/roberta-base (the files the original
# download_data.sh fetches, plus DL 2020).
#
# Usage:  bash download_data.sh [passage|doc|tokenizer|all] [--dir DIR]      (default: all, DIR=data)
#         bash download_data.sh warmup | models [passage|doc] | runs [passage|doc] [--dir DIR]
#         bash download_data.sh --published      (prints the released-models table below as TSV)
#
#   passage    collectionandqueries.tar.gz (extracted: collection.tsv, queries.{train,dev,eval}[.small].tsv,
#              qrels.*), msmarco-test2019-queries.tsv, 2019qrels-pass.txt, msmarco-test2020-queries.tsv,
#              2020qrels-pass.txt (TREC DL 2020: preprocess's test2020 split)                   ~1 GB download
#   doc        msmarco-docs.tsv, msmarco-doc{train,dev}-{queries,qrels}.tsv, msmarco-test2019-queries.tsv,
#              docleaderboard-queries.tsv (the original forgot to gunzip it, so doc preprocessing crashed),
#              msmarco-doctrain-top100 (official BM25 top-100 train run: the doc warm-up's negatives),
#              2019qrels-docs.txt, msmarco-test2020-queries.tsv, 2020qrels-docs.txt         ~8.5 GB download
#   tokenizer  roberta-base vocab.json + merges.txt (the 2.8-faithful preprocessing needs only these)
#   warmup     ANCE's BM25-negative warm-up checkpoint (the passage STAR run starts from it), extracted into
#              DIR/passage/warmup                  (size not measured: a RoBERTa-base checkpoint is ~0.5 GB)
#   models     the released Inbatch-Neg, Rand-Neg, STAR and ADORE models of both tasks (or of the one named) into
#              DIR/{passage,doc}/released/KEY (KEY: inbatch rand star adore-inbatch adore-rand adore-star);
#              each folder is checked: config.json and the weights present, loads with DenseEncoder
#              (estimated ~0.5 GB a model, ~3 GB a task)
#   runs       the released Train / Dev / TRECTest rank files of STAR and ADORE(STAR) into
#              DIR/{passage,doc}/released/runs/KEY/{train,dev,test}.rank.tsv, as published (size not published;
#              reproduce.sh released-* compares the dev and test ones with ours)
#
# warmup, models and runs are Google Drive files (the links of the original README) fetched with gdown (pip
# install 'gdown>=5.2', or the project's [download] extra), which passes Drive's confirmation step for large files;
# PYTHON (default python) checks the model folders.  A folder is downloaded into DEST.part and renamed to DEST
# once checked (DEST.done marks it complete); a rerun continues an interrupted one (gdown --continue).
#
# Resumable: a file is complete when its DEST.done marker exists (written after the download, the checksum and
# the extraction succeeded) and is then skipped; an interrupted download continues where it stopped (curl -C - /
# wget -c on DEST.part).  Checksums: md5 of collectionandqueries.tar.gz (published in pyserini's docs) and the
# sha256 of the tokenizer files; the other files have no published checksum (gzip -t checks the archives).
# Every file is attempted; the failures are listed at the end and the exit status is 1 if any.
#
# Sources (override for mirrors or tests): MSMARCO_BASE_URL (default
# https://msmarco.z22.web.core.windows.net/msmarcoranking, the retired msmarco.blob.core.windows.net's successor),
# TREC_BASE_URL (https://trec.nist.gov/data/deep), ROBERTA_BASE_URL (Hugging Face roberta-base at a fixed
# revision), PASSAGE_ARCHIVE_MD5 (the expected md5 of collectionandqueries.tar.gz).  Archives are removed once
# extracted (KEEP_ARCHIVES=1 keeps them).
set -euo pipefail

MSMARCO=${MSMARCO_BASE_URL:-https://msmarco.z22.web.core.windows.net/msmarcoranking}
TREC=${TREC_BASE_URL:-https://trec.nist.gov/data/deep}
ROBERTA=${ROBERTA_BASE_URL:-https://huggingface.co/FacebookAI/roberta-base/resolve/e2da8e2f811d1448a5b465c236feacd80ffbac7b}
KEEP_ARCHIVES=${KEEP_ARCHIVES:-0}
PASSAGE_ARCHIVE_MD5=${PASSAGE_ARCHIVE_MD5:-31644046b18952c1386cd4564ba2ae69}   # published in pyserini's docs

usage() { echo "usage: bash download_data.sh [passage|doc|tokenizer|all|warmup|models|runs] [passage|doc]" \
               "[--dir DIR] | --published" >&2; exit 2; }

TARGET=all
DIR=data
RELEASED_TASKS="passage doc"   # the tasks of `models` / `runs`
while (( $# )); do
  case $1 in
    passage|doc) if [[ $TARGET == models || $TARGET == runs ]]; then RELEASED_TASKS=$1; else TARGET=$1; fi ;;
    tokenizer|all|warmup|models|runs) TARGET=$1 ;;
    --published) TARGET=published ;;
    --dir) [[ $# -ge 2 ]] || usage; DIR=$2; shift ;;
    --dir=*) DIR=${1#--dir=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage ;;
  esac
  shift
done

# The released models: one row per model of the original README (DRhard commit 15e2235), the name the paper prints,
# the published Dev MRR (@10 passage, @100 doc), Dev R@100 and DL19 NDCG@10, the Google Drive folder id of the
# model, and for STAR and ADORE(STAR) the file ids of their Train / Dev / TRECTest rank files (- where none).
# `--published` prints it as TSV; reproduce.sh's released-* tasks read the figures from there.
RELEASED="
task    key           name                dev_mrr dev_r100 test_ndcg10 folder_id                         train_run                         dev_run                           test_run
passage inbatch       Inbatch-Neg         0.264   0.837    0.583       1ncFKzr4lz9qdI9ZXEi4AosQ_A900ELBz -                                 -                                 -
passage rand          Rand-Neg            0.301   0.853    0.612       1BJNYcUiFh-Ukc2fibw-3NwPNnAYCZgO9 -                                 -                                 -
passage star          STAR                0.340   0.867    0.642       1bJw8P15cFiV239mTgFQxVilXMWqzqXUU 1FRFTsqmU95IQHYHJ_q5SDCWVnxbWlIXi 1QkPYmpvI3PX3vWZEO4zsEcoxLipIEsHA 1VBPJKKrkZw7RAS5gUJX--lb6Qsu-72D8
passage adore-inbatch ADORE(Inbatch-Neg)  0.316   0.860    0.658       1Kuwnit7SBoMVZ6s2Mz9RAORQlYU6zG8K -                                 -                                 -
passage adore-rand    ADORE(Rand-Neg)     0.326   0.865    0.661       1U8Nq_LLyVZPh26_ldnSAvsYNk7g43IkE -                                 -                                 -
passage adore-star    ADORE(STAR)         0.347   0.876    0.683       1C1GQGfI4UHg99rfRcPYzQxlGZXvtsDfm 1zJTPwnUdX_1vkcaQ4SLwtF4L-h24oQOg 1pm4pRimapKZDVqnvLpiYFmgBRKdKlJZW 19Vp57INLBszrO6qk6eCfcaH3oY-5HDKR
doc     inbatch       Inbatch-Neg         0.320   0.864    0.544       1wQ6bCH8TjNxazVoKW08DmggPOjO2-Y-H -                                 -                                 -
doc     rand          Rand-Neg            0.330   0.859    0.572       15oGEZbOeqWz0k77R_xE26VBwcEo4VJuE -                                 -                                 -
doc     star          STAR                0.390   0.867    0.605       18GrqZxeiYFxeMfSs97UxkVHwIhZPVXTc 1Gcp7dbAzpslIIaV_KFkZg4UOkp0ev_eL 17yR6BRLzfW1bxr-VaQ2w2cKpClgcFTej 1Mh2BtPYvXRnT2Uz2ZYALZuXQQq3IHApS
doc     adore-inbatch ADORE(Inbatch-Neg)  0.362   0.884    0.580       1Lvz8aLZyzqm9faCWzoQfJJwbL4vdZu2l -                                 -                                 -
doc     adore-rand    ADORE(Rand-Neg)     0.361   0.885    0.585       1gH5pTfqBkComxPXhFgdbPRD9r1vZWYZO -                                 -                                 -
doc     adore-star    ADORE(STAR)         0.405   0.919    0.628       1p9FZ8iqqZ9rsfgDzntlNBVKNEf7-2Hih 1XGXdo6LG8VwHvtCbevbvmu3GkwPiV_NC 1vY_q-jzU0CHhOtv_UIYSDkU-l6Kj8fEX 1N1ouaMgNdPhjqJMXUBOU5Rg28_T7wapv
"
WARMUP_ID=1URYU1gxNgcuC81jPAev1ksZjMKgQQFoD   # ANCE's passage warm-up (BM25 negatives), a zip
RUN_SPLITS=(train dev test)                    # the columns train_run dev_run test_run (TRECTest = DL19: test)
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)

FAILED=()

# fetch URL DEST [HASH_KIND HASH]: download URL to DEST (resuming DEST.part), verify the hash if given.
fetch() {
  local url=$1 dest=$2 kind=${3:-} expected=${4:-}
  if [[ -f $dest && -f $dest.done ]]; then
    echo "  ok (already complete) $dest"
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  echo "  downloading $url"
  if command -v curl > /dev/null; then
    curl -fL --retry 3 --retry-delay 5 -C - -o "$dest.part" "$url" || return 1
  else
    wget -c -O "$dest.part" "$url" || return 1
  fi
  if [[ -n $kind ]]; then
    local actual
    actual=$("${kind}sum" "$dest.part" | cut -d' ' -f1)
    if [[ $actual != "$expected" ]]; then
      echo "  $kind mismatch for $dest: expected $expected, got $actual (the partial file is removed)" >&2
      rm -f "$dest.part"
      return 1
    fi
    echo "  $kind ok"
  fi
  mv -f "$dest.part" "$dest"
  touch "$dest.done"
}

# gunzipped URL DEST: DEST (uncompressed) from URL = DEST.gz; the archive is checked, then removed.
gunzipped() {
  local url=$1 dest=$2
  if [[ -f $dest && -f $dest.done ]]; then
    echo "  ok (already complete) $dest"
    return 0
  fi
  fetch "$url" "$dest.gz" || return 1
  echo "  gunzip $dest.gz"
  gzip -t "$dest.gz" || { echo "  corrupt archive $dest.gz (removed: rerun to download it again)" >&2
                          rm -f "$dest.gz" "$dest.gz.done"; return 1; }
  gzip -dc "$dest.gz" > "$dest.tmp" && mv -f "$dest.tmp" "$dest" && touch "$dest.done" || return 1
  [[ $KEEP_ARCHIVES == 1 ]] || rm -f "$dest.gz" "$dest.gz.done"
}

# untarred URL FOLDER MARKER MD5: extract URL (a .tar.gz) into FOLDER; MARKER is written when done.
untarred() {
  local url=$1 folder=$2 marker=$3 md5=$4 archive
  archive=$folder/$(basename "$url")
  if [[ -f $marker ]]; then
    echo "  ok (already extracted) $archive"
    return 0
  fi
  fetch "$url" "$archive" md5 "$md5" || return 1
  echo "  extracting $archive"
  tar -xzf "$archive" -C "$folder" || return 1
  touch "$marker"
  [[ $KEEP_ARCHIVES == 1 ]] || rm -f "$archive" "$archive.done"
}

# step DESCRIPTION COMMAND...: run COMMAND, record DESCRIPTION as failed if it fails (and go on)
step() {
  local what=$1; shift
  "$@" || { echo "  FAILED: $what" >&2; FAILED+=("$what"); }
}

passage() {
  local d=$DIR/passage/dataset
  echo "== MS MARCO passage -> $d"
  step "collectionandqueries.tar.gz" untarred "$MSMARCO/collectionandqueries.tar.gz" "$d" \
    "$d/collectionandqueries.done" "$PASSAGE_ARCHIVE_MD5"
  step "msmarco-test2019-queries.tsv (passage)" gunzipped "$MSMARCO/msmarco-test2019-queries.tsv.gz" \
    "$d/msmarco-test2019-queries.tsv"
  step "2019qrels-pass.txt" fetch "$TREC/2019qrels-pass.txt" "$d/2019qrels-pass.txt"
  step "msmarco-test2020-queries.tsv (passage)" gunzipped "$MSMARCO/msmarco-test2020-queries.tsv.gz" \
    "$d/msmarco-test2020-queries.tsv"
  step "2020qrels-pass.txt" fetch "$TREC/2020qrels-pass.txt" "$d/2020qrels-pass.txt"
}

doc() {
  local d=$DIR/doc/dataset name
  echo "== MS MARCO document -> $d"
  for name in msmarco-docs.tsv msmarco-doctrain-queries.tsv msmarco-doctrain-qrels.tsv msmarco-test2019-queries.tsv \
              msmarco-test2020-queries.tsv msmarco-docdev-queries.tsv msmarco-docdev-qrels.tsv \
              docleaderboard-queries.tsv; do
    step "$name (doc)" gunzipped "$MSMARCO/$name.gz" "$d/$name"
  done
  step "msmarco-doctrain-top100" gunzipped "$MSMARCO/msmarco-doctrain-top100.gz" "$d/msmarco-doctrain-top100"
  step "2019qrels-docs.txt" fetch "$TREC/2019qrels-docs.txt" "$d/2019qrels-docs.txt"
  step "2020qrels-docs.txt" fetch "$TREC/2020qrels-docs.txt" "$d/2020qrels-docs.txt"
}

tokenizer() {
  local d=$DIR/roberta-base
  echo "== roberta-base tokenizer -> $d"
  step "roberta-base vocab.json" fetch "$ROBERTA/vocab.json" "$d/vocab.json" \
    sha256 9e7f63c2d15d666b52e21d250d2e513b87c9b713cfa6987a82ed89e5e6e50655
  step "roberta-base merges.txt" fetch "$ROBERTA/merges.txt" "$d/merges.txt" \
    sha256 1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5
}

# --- the released models (Google Drive, gdown) -----------------------------------------------------------------

# released_rows TASK: the table's rows of TASK, without the header
released_rows() { awk -v task="$1" 'NF && $1 == task' <<< "$RELEASED"; }

published() { awk 'NF { $1 = $1; print }' OFS='\t' <<< "$RELEASED"; }

require_gdown() {
  command -v gdown > /dev/null && return 0
  echo "download_data.sh: gdown is not installed (the released files are on Google Drive): pip install 'gdown>=5.2'" \
       "(or pip install -e '.[download]')" >&2
  exit 2
}

# check_model_folders FOLDER...: one line per folder, "ok<TAB>FOLDER<TAB>what it is" or "bad<TAB>FOLDER<TAB>why":
# config.json and the weights present, and it loads with DenseEncoder.from_pretrained (one Python process for all)
check_model_folders() {
  PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import sys
from pathlib import Path
from model import DenseEncoder

for folder in map(Path, sys.argv[1:]):
    if not (folder / "config.json").is_file() or not any(
            (folder / name).is_file() for name in ("pytorch_model.bin", "model.safetensors")):
        print(f"bad\t{folder}\tlacks config.json or pytorch_model.bin")
        continue
    try:
        model = DenseEncoder.from_pretrained(folder)
    except Exception as e:
        print(f"bad\t{folder}\tdoes not load with DenseEncoder: {e}".replace("\n", " "))
        continue
    print(f"ok\t{folder}\t{model.output_dim}-d embeddings, head: {model.head}")' "$@"
}

# model_root FOLDER: FOLDER, or its one subfolder holding config.json (a Drive folder or zip may nest the model)
model_root() {
  local found
  found=$(find "$1" -name config.json -printf '%h\n')
  if [[ -n $found && $(wc -l <<< "$found") == 1 ]]; then echo "$found"; else echo "$1"; fi
}

# Downloaded model folders awaiting their check: where each lies, where it goes, what it is (for the failures).
PENDING_FROM=() PENDING_DEST=() PENDING_WHAT=()

# install_pending: check the pending folders; move each good one to its DEST (DEST.done marks it complete); one
# failing its check is removed, so that a rerun downloads it again
install_pending() {
  local i roots=() verdict folder detail
  (( ${#PENDING_FROM[@]} )) || return 0
  for i in "${!PENDING_FROM[@]}"; do
    roots+=("$(model_root "${PENDING_FROM[i]}")")
  done
  i=0
  while IFS=$'\t' read -r verdict folder detail; do
    if [[ $verdict == ok ]]; then
      mv "$folder" "${PENDING_DEST[i]}"
      rm -rf "${PENDING_FROM[i]}"
      touch "${PENDING_DEST[i]}.done"
      echo "  checked ${PENDING_DEST[i]}: loads with DenseEncoder ($detail)"
    else
      echo "  $folder $detail (removed: rerun to download it again)" >&2
      rm -rf "${PENDING_FROM[i]}"
      FAILED+=("${PENDING_WHAT[i]}")
    fi
    i=$((i + 1))
  done < <(check_model_folders "${roots[@]}")
  for (( ; i < ${#PENDING_FROM[@]}; i++ )); do   # the check itself failed (e.g. no torch in PYTHON)
    echo "  ${PENDING_FROM[i]}: not checked (PYTHON=$PY could not run the check)" >&2
    FAILED+=("${PENDING_WHAT[i]}")
  done
  PENDING_FROM=() PENDING_DEST=() PENDING_WHAT=()
}

# pending FROM DEST WHAT: FROM awaits its check before it becomes DEST
pending() { PENDING_FROM+=("$1"); PENDING_DEST+=("$2"); PENDING_WHAT+=("$3"); }

# not_ours DEST: fails (saying so) when DEST exists without its .done marker: a folder put there by hand is kept
not_ours() {
  [[ -e $1 ]] || return 0
  echo "  $1 exists but was not downloaded by this script (no $1.done): move it away to download it" >&2
  return 1
}

# drive_folder ID DEST WHAT: the Drive folder ID into DEST.part (gdown resumes it), then pending its check
drive_folder() {
  local id=$1 dest=$2
  if [[ -d $dest && -f $dest.done ]]; then
    echo "  ok (already complete) $dest"
    return 0
  fi
  not_ours "$dest" || return 1
  mkdir -p "$dest.part"
  echo "  downloading Drive folder $id"
  gdown --folder "https://drive.google.com/drive/folders/$id" -O "$dest.part" --continue || return 1
  pending "$dest.part" "$dest" "$3"
}

# drive_file ID DEST: the Drive file ID as DEST (gdown resumes DEST.part); DEST.done marks it complete
drive_file() {
  local id=$1 dest=$2
  if [[ -f $dest && -f $dest.done ]]; then
    echo "  ok (already complete) $dest"
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  echo "  downloading Drive file $id"
  gdown "https://drive.google.com/uc?id=$id" -O "$dest.part" --continue || return 1
  mv -f "$dest.part" "$dest"
  touch "$dest.done"
}

# warmup_checkpoint: the warm-up zip, extracted into DIR/passage/warmup.tmp, then pending its check
warmup_checkpoint() {
  local d=$DIR/passage archive=$DIR/passage/warmup.zip
  if [[ -d $d/warmup && -f $d/warmup.done ]]; then
    echo "  ok (already complete) $d/warmup"
    return 0
  fi
  not_ours "$d/warmup" || return 1
  drive_file "$WARMUP_ID" "$archive" || return 1
  echo "  extracting $archive"
  rm -rf "$d/warmup.tmp"
  if ! "$PY" -m zipfile -t "$archive" > /dev/null 2>&1 || ! "$PY" -m zipfile -e "$archive" "$d/warmup.tmp"; then
    echo "  corrupt archive $archive (removed: rerun to download it again)" >&2
    rm -f "$archive" "$archive.done"
    return 1
  fi
  pending "$d/warmup.tmp" "$d/warmup" "warm-up checkpoint"
}

warmup() {
  local archive=$DIR/passage/warmup.zip
  echo "== ANCE warm-up checkpoint -> $DIR/passage/warmup"
  step "warm-up checkpoint" warmup_checkpoint
  install_pending
  if [[ $KEEP_ARCHIVES != 1 && -f $DIR/passage/warmup.done ]]; then
    rm -f "$archive" "$archive.done"
  fi
}

models() {
  local task key name id
  for task in $RELEASED_TASKS; do
    echo "== released $task models -> $DIR/$task/released"
    while read -r task key name _ _ _ id _; do
      step "$name ($task model)" drive_folder "$id" "$DIR/$task/released/$key" "$name ($task model)"
    done < <(released_rows "$task")
  done
  install_pending
}

runs() {
  local task key name i ids
  for task in $RELEASED_TASKS; do
    echo "== released $task rank files -> $DIR/$task/released/runs"
    while read -r task key name _ _ _ _ ids; do
      read -r -a ids <<< "$ids"
      for i in "${!RUN_SPLITS[@]}"; do
        [[ ${ids[i]} == - ]] && continue
        step "$name ${RUN_SPLITS[i]}.rank.tsv ($task)" drive_file "${ids[i]}" \
          "$DIR/$task/released/runs/$key/${RUN_SPLITS[i]}.rank.tsv"
      done
    done < <(released_rows "$task")
  done
}

case $TARGET in
  published) published; exit 0 ;;
  warmup|models|runs) require_gdown; $TARGET ;;
  passage) passage; tokenizer ;;
  doc) doc; tokenizer ;;
  tokenizer) tokenizer ;;
  all) passage; doc; tokenizer ;;
esac

if (( ${#FAILED[@]} )); then
  echo >&2
  echo "download_data.sh: ${#FAILED[@]} item(s) failed (rerun to resume; completed files are skipped):" >&2
  printf '  - %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "download_data.sh: $TARGET complete in $DIR"
