"""One run per output: every command that writes an output folder holds a lock on it for its whole run.

The lock is ``fcntl.flock`` on a small file next to the output, ``PARENT/.NAME.lock`` (inside the folder, as
``NAME/.run.lock``, where the parent is not writable), deleted when the run ends (a killed run leaves it; the next
run takes it over).  Its holder writes a record into it — pid,
host, torchrun job id (``TORCHELASTIC_RUN_ID``), the start time — which a refused run names in
its one ``error:`` line.  What it guarantees:

* A second run into the same output, started while the first runs, is refused at once (:class:`InputError`, exit
  status 2), before it reads or writes anything else.
* The kernel drops a flock when its holder ends, however it ends (SIGKILL included): a lock left by a dead process
  never blocks.  The lock belongs to the open file, so a child the holder forked (a data-loader worker) keeps it
  until it ends too; the refusal then says the recorded holder is gone.
* The processes of one torchrun job share its lock: rank 0 takes it; every other rank waits until the record
  names its own job (torchrun ends the job when rank 0 is refused).
* ``--shard_id`` jobs (job arrays that encode shards of one corpus into one folder side by side) hold the folder's
  lock shared — so they run together but never beside a whole run — and their shard's own lock exclusively.

On a network file system the lock is as good as the file system's locking: Linux's NFS client maps flock onto
NFS byte-range locks, honoured across hosts with NFSv4 (or NFSv3 with lockd); a crashed client's lock is freed
only when the server's lease runs out (NFSv4: about 90 s), and a mount with ``nolock`` or ``local_lock=all`` locks
per host only, so two hosts could both run.  A run that finds a record of another live-looking host while holding
the lock warns about that.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO, Iterator, Optional

from infra.io import InputError, PathLike, env_int, writing

logger = logging.getLogger(__name__)

#: how long a torchrun rank other than 0 waits for rank 0 to take the job's lock
RANK_WAIT_S = 600.0
_POLL_S = 0.05
#: how long a refused run waits for a fresh holder to write its record before naming what the file holds
_RECORD_WAIT_S = 1.0


def lock_file(output: PathLike, shard: Optional[int] = None) -> Path:
    """The lock file of ``output`` (a folder or a file): ``PARENT/.NAME.lock`` (``.NAME.shard-K.lock`` for
    ``--shard_id K``), or ``NAME/.run.lock`` when the parent is not writable."""
    path = Path(os.path.abspath(output))
    path = path.parent.resolve() / path.name  # one lock for the names that reach the same folder
    suffix = "" if shard is None else f".shard-{shard}"
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK):
        return path / f".run{suffix}.lock"
    return path.parent / f".{path.name}{suffix}.lock"


def job_id() -> Optional[str]:
    """The torchrun job this process belongs to (several processes), or None."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if env_int("WORLD_SIZE", 1) > 1 else None


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "job": job_id(), "started": time.strftime("%c")}


def _read_record(handle: IO[str]) -> dict:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "{}")
    except ValueError:  # being written by its holder
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(handle: IO[str], path: Path) -> None:
    with writing(path):
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_record()))
        handle.flush()


def _process_gone(record: dict) -> bool:
    """The record names a process of this host that no longer runs."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def describe(record: dict) -> str:
    """``pid P on host H (torchrun job J)``, or what is known of the holder."""
    if not record:
        return "a process that has not written its record yet"
    text = f"pid {record.get('pid')} on host {record.get('host')}"
    if record.get("job"):
        text += f" (torchrun job {record['job']})"
    if _process_gone(record):
        text += ", which has ended: a process it started still holds the lock"
    return text


def _try_lock(handle: IO[str], shared: bool) -> bool:
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return False
        raise
    return True


def _refusal(output: Path, handle: IO[str]) -> InputError:
    """The error of a run that found ``output`` locked (the holder's record, once it is written)."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    record = _read_record(handle)
    while (not record or _process_gone(record)) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        record = _read_record(handle)
    return InputError(f"another run is writing here: {describe(record)}; wait for it to end or choose another "
                      f"output", path=output)


def _open(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+", encoding="utf-8")


def _still_linked(handle: IO[str], path: Path) -> bool:
    """``path`` is still the file ``handle`` locked (a holder that ended may have deleted it meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _lock(output: Path, path: Path, shared: bool) -> IO[str]:
    """The open lock file ``path``, locked; the refusal when another run holds it."""
    while True:
        handle = _open(path)
        if not _try_lock(handle, shared):
            error = _refusal(output, handle)
            handle.close()
            raise error
        if _still_linked(handle, path):
            return handle
        handle.close()  # locked a file its holder deleted on leaving: lock the one there now


def _release(handle: IO[str], path: Path) -> None:
    """Delete the lock file (so a finished run leaves nothing behind), unless other shared holders still hold it;
    then unlock.  Deleting before unlocking is safe: a run that locks the deleted file sees it and retries."""
    if _try_lock(handle, shared=False):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    handle.close()


@contextlib.contextmanager
def _held(output: Path, path: Path, shared: bool) -> Iterator[None]:
    """Hold ``path`` (exclusive, or shared with other shared holders), or raise the refusal."""
    handle = _lock(output, path, shared)
    try:
        previous = _read_record(handle)
        if previous.get("host") not in (None, socket.gethostname()) and not shared:
            logger.warning("%s names a run on host %s that did not release it: if that run still writes into %s, "
                           "this file system does not share locks between hosts", path, previous["host"], output)
        _write_record(handle, path)
        yield
    finally:
        _release(handle, path)


def _wait_for_job(output: Path, path: Path, job: str) -> None:
    """Another rank of torchrun job ``job``: return once rank 0 holds the lock for this job."""
    deadline = time.monotonic() + RANK_WAIT_S
    while not _held_by_job(path, job):
        if time.monotonic() > deadline:
            raise InputError(f"rank 0 of torchrun job {job} did not take the lock in {RANK_WAIT_S:.0f} s",
                             path=output)
        time.sleep(_POLL_S)


def _held_by_job(path: Path, job: str) -> bool:
    """The record of ``path`` names torchrun job ``job`` (read only: a probing lock could make rank 0's fail).  A
    record of this job is written by its rank 0 holding the lock; a run holding it has replaced any older one."""
    try:
        with open(path, encoding="utf-8") as handle:
            return _read_record(handle).get("job") == job
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def output_lock(output: PathLike, shard: Optional[int] = None) -> Iterator[None]:
    """Hold the lock of ``output`` (a folder, or a file) for the block: raise :class:`InputError` naming the
    holder when another run holds it.  ``shard``: this is the ``--shard_id`` job ``shard`` (see the module)."""
    output = Path(output)
    job = job_id()
    if job is not None and env_int("RANK", 0) != 0:
        _wait_for_job(output, lock_file(output), job)
        yield
        return
    with _held(output, lock_file(output), shared=shard is not None):
        if shard is None:
            yield
            return
        with _held(output, lock_file(output, shard), shared=False):
            yield
