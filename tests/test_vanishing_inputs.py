"""Read-only or vanishing inputs (issue #22): an input folder made unreadable, or a token memmap cut short by another
process while a long run reads it, ends the real CLI with one line naming the file, exit status 2, no traceback and
no corrupt output (only an embedding memmap's resume state, which its manifest marks incomplete)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers import ENV, REPO, assert_one_error, make_encoder_inputs, run_cli, star_inference_args


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its mode")
def test_unreadable_input_folder_is_one_line_naming_it(tmp_path):
    inputs = make_encoder_inputs(tmp_path / "in", n_docs=40)
    out = tmp_path / "out"
    inputs["pre"].chmod(0)
    try:
        result = run_cli(star_inference_args(inputs, out))
    finally:
        inputs["pre"].chmod(0o755)
    assert_one_error(result, str(inputs["pre"]))  # "Permission denied" (3.11, 3.12) or "not found" (3.13)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_token_memmap_cut_short_while_encoding_is_one_line_naming_it(tmp_path):
    """star.inference encodes 12 000 passages; once its output appears, another process cuts the preprocessed
    passages.memmap to half: the next batch's read is refused naming the file (instead of SIGBUS)."""
    inputs = make_encoder_inputs(tmp_path / "in", n_docs=12_000)
    tokens = inputs["pre"] / "passages.memmap"
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *map(str, star_inference_args(inputs, out))], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "passages.memmap").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.005)
    os.truncate(tokens, tokens.stat().st_size // 2)
    _, stderr = proc.communicate(timeout=300)
    assert_one_error(subprocess.CompletedProcess([], proc.returncode, "", stderr), str(tokens),
                     "cut short while being read")
    assert not (out / "dev.rank.tsv").exists()
    assert '"complete": false' in (out / "passages.memmap.manifest.json").read_text()  # resume state only
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
