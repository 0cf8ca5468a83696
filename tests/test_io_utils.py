"""io_utils: temporaries left by killed processes are removed, live ones kept; atomic folder replacement."""
import os
import subprocess
import sys

import pytest

from infra.io import atomic_directory, atomic_write_text, remove_stale_temporaries


@pytest.fixture(scope="module")
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path, dead_pid):
    (tmp_path / f"passages.memmap.tmp-{dead_pid}").write_bytes(b"half")
    (tmp_path / f"checkpoint-3.tmp-{dead_pid}").mkdir()
    (tmp_path / f"checkpoint-3.tmp-{dead_pid}" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f"epoch-1.old-{dead_pid}").mkdir()
    keep = [f"mine.tmp-{os.getpid()}", f"parent.tmp-{os.getppid()}", "notes.tmp-abc", "passages.memmap",
            f"tmp-{dead_pid}"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f"passages.memmap.tmp-{dead_pid}",
                                                       f"checkpoint-3.tmp-{dead_pid}", f"epoch-1.old-{dead_pid}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_prefix_limits_what_is_removed_and_atomic_writes_clean_their_own_name(tmp_path, dead_pid):
    (tmp_path / f"a.tsv.tmp-{dead_pid}").write_text("half")
    (tmp_path / f"b.tsv.tmp-{dead_pid}").write_text("half")
    assert remove_stale_temporaries(tmp_path, prefix="c.tsv.") == []
    atomic_write_text(tmp_path / "a.tsv", "done\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", f"b.tsv.tmp-{dead_pid}"]
    assert remove_stale_temporaries(tmp_path / "absent") == []


def test_atomic_directory_replaces_only_on_success(tmp_path):
    final = tmp_path / "epoch-1"
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("v1")
        assert not final.exists()
    assert (final / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "weights").write_text("v2, half written")
            raise RuntimeError("killed")
    assert (final / "weights").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1"]
    with atomic_directory(final) as tmp:
        (tmp / "other").write_text("v3")
    assert sorted(p.name for p in final.iterdir()) == ["other"] and [p.name for p in tmp_path.iterdir()] == ["epoch-1"]
