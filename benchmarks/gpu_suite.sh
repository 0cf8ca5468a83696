#!/usr/bin/env bash
# The GPU benchmark suite of issue #12, one command:
#
#   bash benchmarks/gpu_suite.sh [--smoke] [--out DIR] [--shared DIR] [--stages star parts encode e2e adore] ...
#
# On one CUDA GPU, with no network: builds its own data from shared/ (the 4,103 real MS MARCO passages of the DL19
# judged subset, repeated; pseudo-queries as training data) and a random roberta-base-size model, then runs
#   star    STAR steps (batch 256, q 24 / d 120, 1 hard negative): fp16 + gradient checkpointing, bf16
#   parts   the step's non-model parts: collation, Lamb per parameter vs multi-tensor, clipping, host reads
#   encode  corpus encoding: star.inference's defaults, the best settings, the original's way (offset order,
#           pad to 256, fp32), sentence-transformers (when installed)
#   e2e     star.inference -> star.prepare_hardneg -> star.train -> adore.train -> adore.inference on CUDA
#   adore   an ADORE step against 8,841,823 document embeddings (benchmarks/bench_adore.py --rows 8841823)
# prints one table and writes DIR/gpu_suite.json (+ each stage's output in DIR/logs/), in <= 8 minutes in all
# (--budget_s 480: stages that would start later are skipped and listed).  Stages that need faiss (e2e, adore)
# are skipped, with the reason, where it is not importable.
#
#   --smoke         CPU, tiny model and data: every stage in about a minute (tests/test_gpu_suite.py runs it)
#   --out DIR       results folder (default $OUT/gpu_suite when $OUT is set, else /tmp/gpu_suite-DATE)
#   --shared DIR    the shared/ folder (default ./shared, else ../shared)
#   --keep_work     keep the generated data, models and checkpoints (a temporary folder outside DIR)
# More knobs: python benchmarks/gpu_suite.py --help.  Exit status 0 when no stage failed (skips are fine), 1 when
# one failed, 2 for a usage error (no shared/ folder, no CUDA without --smoke).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x $here/../.venv/bin/python ]]; then PY=$here/../.venv/bin/python; else PY=python3; fi
fi
exec "$PY" "$here/gpu_suite.py" "$@"
