"""Small I/O helpers shared by every script: user-facing input errors, strict text reading and
atomic writes.

Conventions
-----------
* A problem with the *user's input* (a bad line, a missing file, a refused overwrite) raises
  :class:`InputError`.  Every CLI's ``main`` is wrapped by :func:`run_cli`, which prints the message
  (``error: FILE:LINE: what (got VALUE)``) without a traceback and exits with status 2.
* Every output file is written to ``<name>.tmp-<pid>`` next to its final path and renamed into place
  only when complete (:func:`atomic_output`), so a crash never leaves a half-written file under the
  final name.  What a killed process leaves under such a name is deleted by the next run that writes the
  same output (:func:`remove_stale_temporaries`).
* SIGTERM (what a scheduler sends at a job's time limit) ends a CLI like an error: the atomic writes under way
  delete their temporaries, one ``terminated`` line is printed, and the exit status is 143 (128 + SIGTERM, the
  status a shell reports for a process SIGTERM ended).  A rerun resumes (training: with ``--resume``).
* A write that fails for want of room (full disk, quota, file size limit) is reported as one line naming the file
  being written (:func:`atomic_output`, :func:`atomic_directory`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


class InputError(Exception):
    """A user error in an input file or argument: names the file, the line and the bad value."""

    def __init__(self, message: str, path: Optional[PathLike] = None, line: Optional[int] = None,
                 value: Any = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.value = value
        where = ""
        if self.path is not None:
            where = self.path + (f":{line}" if line is not None else "") + ": "
        got = "" if value is None else f" (got {value!r})"
        super().__init__(f"{where}{message}{got}")


def require_file(path: PathLike, what: str = "input file") -> Path:
    """Return ``Path(path)`` or raise :class:`InputError` if it is not an existing file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found", path=p)
    return p


def read_json(path: PathLike, what: str = "JSON file", expect: Optional[type] = dict) -> Any:
    """The JSON value stored in ``path`` (UTF-8).  A missing file, text that does not parse, or (with ``expect``)
    a value of another type raises :class:`InputError` naming the file."""
    p = require_file(path, what)
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{what} is not valid JSON ({e})", path=p) from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "object", list: "array"}.get(expect, expect.__name__)
        raise InputError(f"{what} is not a JSON {kind}", path=p)
    return value


def iter_lines(path: PathLike, what: str = "input file") -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of a UTF-8 text file, 1-based, without the line end.

    Accepts LF and CRLF line ends and a leading UTF-8 byte-order mark.  Bytes that are not UTF-8 raise
    :class:`InputError` naming the line.  Blank lines are yielded (callers decide what they mean).
    """
    p = require_file(path, what)
    with open(p, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[max(0, e.start - 10): e.end + 10]
                raise InputError("bytes that are not UTF-8", path=p, line=number, value=bad) from None
            yield number, line.rstrip("\r\n")


def parse_int(text: str, path: PathLike, line: int, what: str = "id", allow_negative: bool = False) -> int:
    """Parse an integer field, raising :class:`InputError` naming file, line and value."""
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{what} is not an integer", path=path, line=line, value=text) from None
    if value < 0 and not allow_negative:
        raise InputError(f"{what} is negative", path=path, line=line, value=text)
    return value


def _tmp_name(final: Path) -> Path:
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


_TEMPORARY = re.compile(r".+\.(?:tmp|old)-(\d+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: PathLike, prefix: str = "") -> list[Path]:
    """Delete the ``NAME.tmp-<pid>`` / ``NAME.old-<pid>`` files and folders directly under ``folder`` (``NAME``
    starting with ``prefix``) whose process no longer runs: what a killed run left half-written (never taken for
    a complete output, the name differs, but as large as the output: 18 GB for the passage token memmap).
    Temporaries of this process and of live processes are kept.  Returns the paths removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if not match or not path.name.startswith(prefix):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# how torch.save and safetensors report a failed write (RuntimeError / SafetensorError, no errno)
_NO_ROOM_MESSAGES = ("file write failed", "No space left on device", "File too large", "Disk quota exceeded")


def _no_room(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in _NO_ROOM
    return type(e).__name__ in ("RuntimeError", "SafetensorError") and any(m in str(e) for m in _NO_ROOM_MESSAGES)


@contextlib.contextmanager
def writing(path: PathLike) -> Iterator[None]:
    """A failed write for want of room (full disk, quota, file size limit) inside the block becomes an
    :class:`OSError` naming ``path``, which :func:`run_cli` reports as one line (the libraries' errors name no
    file, or a temporary one)."""
    try:
        yield
    except BaseException as e:
        if not _no_room(e):
            raise
        code = e.errno if isinstance(e, OSError) else errno.ENOSPC
        reason = os.strerror(code) if isinstance(e, OSError) else "the write failed"
        raise OSError(code, f"no room to write it ({reason}); free space and rerun", str(path)) from None


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    On any exception the temporary file is removed and whatever was at ``path`` before is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, prefix=final.name + ".")
    tmp = _tmp_name(final)
    try:
        with writing(final):
            yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds, it replaces ``path`` (an older
    ``path`` is renamed aside to ``NAME.old-<pid>`` first, then deleted).  On any exception the temporary folder
    is deleted and ``path`` is untouched."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, prefix=final.name + ".")
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        with writing(final):
            yield tmp
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, LF) to ``path`` atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=None, sort_keys=False))


def atomic_save_npy(path: PathLike, array: Any) -> None:
    """``np.save`` to ``path`` atomically (the name is kept exactly; no ``.npy`` is appended)."""
    import numpy as np

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
            check_written(f, path)


def check_written(f: BinaryIO, path: PathLike) -> None:
    """Raise an :class:`OSError` naming ``path`` when the open file ``f`` is shorter than what was written into it:
    numpy's ``tofile`` (which ``np.save`` uses) ignores a write cut short by a full disk or a size limit."""
    f.flush()
    if os.fstat(f.fileno()).st_size < f.tell():
        raise OSError(errno.ENOSPC, "no room to write it (a write was cut short); free space and rerun", str(path))


def refuse_existing(path: PathLike, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raise :class:`InputError` if ``path`` exists and ``overwrite`` is false."""
    if Path(path).exists() and not overwrite:
        raise InputError(f"output already exists; pass {flag} to replace it", path=path)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(main_process: bool = True) -> None:
    """The scripts' console logging: INFO lines with time and logger name; WARNING only on the other ranks of a
    torchrun job, so that one process reports progress."""
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format=LOG_FORMAT)


def env_int(name: str, default: int) -> int:
    """The integer in environment variable ``name`` (``default`` when unset or empty)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name} is not an integer", value=value) from None


def refuse_torchrun() -> None:
    """Raise :class:`InputError` in a process that torchrun started as one of several (``WORLD_SIZE`` > 1): a
    command that does not split its work would run it once per process, into the same files."""
    world_size = env_int("WORLD_SIZE", 1)
    if world_size > 1:
        raise InputError(f"this command runs as one process, but torchrun started {world_size}: each would redo "
                         f"the whole work and write the same files; run it once without torchrun (the trainers and the "
                         f"inference drivers split their work over torchrun's processes)", value=world_size)


def run_cli(main: Callable[..., Any], argv: Optional[list[str]] = None, torchrun: bool = False) -> None:
    """Run a script's ``main(argv)``; user errors become one ``error:`` line and exit status 2.  Unless the
    script splits its work over processes (``torchrun``), a start by torchrun with several processes is refused
    (:func:`refuse_torchrun`).  A process of a multi-process torchrun job that got this far leaves without the
    interpreter's finalization (:func:`_exit_torchrun_process`)."""
    status = _run_main(main, argv, torchrun)
    if torchrun and env_int("WORLD_SIZE", 1) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun
        _exit_torchrun_process(status)
    if status:
        raise SystemExit(status)


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives (a ``BaseException``: no ``except Exception`` holds it up)."""


TERMINATED_STATUS = 128 + signal.SIGTERM


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[list[bool]]:
    """While the block runs, SIGTERM raises :class:`Terminated`; yields a flag list that is ``[True]`` once it came
    (an error that follows it, e.g. a collective broken by another rank that ended, is part of the termination)."""
    came: list[bool] = []

    def handler(signum: int, frame: Any) -> None:
        if not came:
            came.append(True)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield came
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_main(main: Callable[..., Any], argv: Optional[list[str]], torchrun: bool) -> int:
    """``main(argv)``'s exit status, user errors reported as one ``error:`` line (status 2), SIGTERM as one
    ``terminated`` line (status 143)."""
    with _sigterm_raises() as terminated:
        try:
            return _run_reporting_errors(main, argv, torchrun)
        except BaseException:
            if not terminated:
                raise
        print("terminated (SIGTERM): every output written so far is complete; rerun the command to go on "
              "(training: with --resume)", file=sys.stderr)
        return TERMINATED_STATUS


def _run_reporting_errors(main: Callable[..., Any], argv: Optional[list[str]], torchrun: bool) -> int:
    try:
        if not torchrun:
            refuse_torchrun()
        result = main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, read-only location, file size limit
        if e.filename is None and e.errno is None:
            raise
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def _exit_torchrun_process(status: int) -> None:
    """Flush the console and leave with ``status`` at once (``os._exit``).  After a gloo job's work is done and
    its process group destroyed, gloo's worker threads can still hold tensors that the interpreter's
    finalization frees without the GIL: the process then aborts (SIGABRT, "terminate called without an active
    exception"; pytorch PR #179291) and torchrun reports the finished job as failed.  Every output is written
    and closed before this point (atomic writes, closed TensorBoard writers, flushed memmaps)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
