#!/usr/bin/env bash
# Download MS MARCO (passage and document ranking), the TREC DL 2019 and 2020 test queries and qrels and the
# roberta-base tokenizer files into DIR/{passage,doc}/dataset and DIR/roberta-base (the files the original
# download_data.sh fetches, plus DL 2020).
#
# Usage:  bash download_data.sh [passage|doc|tokenizer|all] [--dir DIR]      (default: all, DIR=data)
#
#   passage    collectionandqueries.tar.gz (extracted: collection.tsv, queries.{train,dev,eval}[.small].tsv,
#              qrels.*), msmarco-test2019-queries.tsv, 2019qrels-pass.txt, msmarco-test2020-queries.tsv,
#              2020qrels-pass.txt (TREC DL 2020: preprocess's test2020 split)                   ~1 GB download
#   doc        msmarco-docs.tsv, msmarco-doc{train,dev}-{queries,qrels}.tsv, msmarco-test2019-queries.tsv,
#              docleaderboard-queries.tsv (the original forgot to gunzip it, so doc preprocessing crashed),
#              msmarco-doctrain-top100 (official BM25 top-100 train run: the doc warm-up's negatives),
#              2019qrels-docs.txt, msmarco-test2020-queries.tsv, 2020qrels-docs.txt         ~8.5 GB download
#   tokenizer  roberta-base vocab.json + merges.txt (the 2.8-faithful preprocessing needs only these)
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

usage() { echo "usage: bash download_data.sh [passage|doc|tokenizer|all] [--dir DIR]" >&2; exit 2; }

TARGET=all
DIR=data
while (( $# )); do
  case $1 in
    passage|doc|tokenizer|all) TARGET=$1 ;;
    --dir) [[ $# -ge 2 ]] || usage; DIR=$2; shift ;;
    --dir=*) DIR=${1#--dir=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage ;;
  esac
  shift
done

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

case $TARGET in
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
