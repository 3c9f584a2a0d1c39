"""Writing outputs so that a failed or killed run never leaves a half-written folder behind.

Lifecycle of ``atomic_output_dir(path, overwrite, expected_bytes)``:
  1. ``check_output_dir``: the path is a folder (or absent), empty unless ``overwrite``, not an
     input of the run, on a writable file system with room for ``expected_bytes``; temporary
     folders that killed runs left beside it are removed (or named when a live process owns
     them). Pipelines call it before any work, again once the model is loaded and the size of
     the output is known;
  2. a temporary folder ``.<name>.tmp-XXXX`` is made beside ``path`` with a marker file naming
     the process (pid, host, start time) that owns it; the output is written to its ``content``
     subfolder. While it is open SIGTERM/SIGHUP (and SIGINT where it would kill without
     unwinding) are turned into an exception, so that every exit we control removes it;
  3. on success the old output (``overwrite``) is moved aside, the new one renamed into place
     and the old one deleted; a failure at any step leaves the previous output as it was.

``kill -9`` cannot be caught: the marker lets the next run into the same parent find the
leftover and remove it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_MARKER = ".hf_sparse_tmp.json"
"""Written first into every temporary output folder: who owns it (pid, host, start time)."""
CONTENT = "content"  # the output inside a temporary folder (the marker sits beside it)
_MARGIN = 64 * 2**20  # bytes kept free beyond the estimate (tokenizer files, cards, metadata)
_CAUGHT_SIGNALS = ("SIGTERM", "SIGHUP")


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM/SIGHUP arrives while an output is being written:
    unwinding removes the temporary folder; the exit code is ``128 + signal``."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}


def _owner_alive(owner: dict) -> bool | None:
    """True/False for a process of this host; None when it runs on another host (unknowable)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    start = _start_time(pid)
    return start is None or owner.get("start") in (None, start)


def clean_stale_outputs(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporary output folders that killed runs left in ``parent``; returns them.

    A folder counts only if it carries our marker and its owner process is gone (same host,
    pid not running or reused). A moved-aside previous output whose replacement never arrived
    is renamed back. Folders of live processes or other hosts are named in a warning.
    """
    parent = Path(parent)
    removed: list[Path] = []
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    except OSError:
        return removed
    for folder in entries:
        try:
            owner = json.loads((folder / TMP_MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours (or not a folder)
        alive = _owner_alive(owner)
        if alive is not False:
            where = "on another host" if alive is None else "still running"
            logger.warning(
                "%s is the temporary output of process %s %s; left in place",
                folder,
                owner.get("pid"),
                where,
            )
            continue
        target = parent / owner["restore"] if owner.get("restore") else None
        if target is not None and not target.exists() and (folder / CONTENT).is_dir():
            os.replace(folder / CONTENT, target)
            logger.warning("restored %s from %s (a killed run had moved it aside)", target, folder)
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("removed %s, left by killed process %s", folder, owner.get("pid"))
        removed.append(folder)
    return removed


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_writable(path: Path, what: str = "output") -> Path:
    """The nearest existing folder at or above ``path``, proven writable by creating and
    removing a probe folder in it (permission bits alone lie for root and read-only mounts)."""
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise NotADirectoryError(f"{what} location {path}: {base} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".hf_sparse-probe-", dir=base)
    except OSError as error:
        raise PermissionError(
            f"{what} location {path} is not writable ({base}: {error.strerror or error}); "
            "choose a folder you can write to"
        ) from None
    os.rmdir(probe)
    return base


def check_writable_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse a folder that cannot be created or written (before any work)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} location {path} exists and is not a folder")
    _check_writable(path, what)
    return path


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    expected_bytes: int | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Refuse an output location that the run could not finish writing (checked before work).

    ``expected_bytes``: the estimated size of the output; the file system must have that much
    free (plus a margin). ``inputs``: local folders the run reads (the model), which the output
    may neither be, nor sit inside, nor contain.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {path} already exists and is not empty; choose another folder or "
            "pass overwrite=True (--overwrite)"
        )
    resolved = path.resolve()
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        source = Path(source).expanduser().resolve()
        if _inside(resolved, source) or _inside(source, resolved):
            raise ValueError(
                f"output folder {path} overlaps the input {source}; the input is never "
                "modified: write the output to another folder"
            )
    base = _check_writable(path.parent if path.exists() else path)
    if expected_bytes is not None:
        free = shutil.disk_usage(base).free
        needed = int(expected_bytes * 1.1) + _MARGIN
        if free < needed:
            raise OSError(
                f"not enough free space for the output in {base}: about {_human(needed)} "
                f"needed, {_human(free)} free; free some space or choose another --output-dir"
            )
    if base == path.parent or base == path:
        clean_stale_outputs(path.parent)
    return path


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (shared tensors once): what a save writes."""
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        key = (tensor.device, tensor.data_ptr()) if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def unwind_on_signals() -> Iterator[None]:
    """While open, SIGTERM/SIGHUP (and SIGINT if it would kill outright) raise ``Terminated``
    so ``finally`` blocks run; handlers the user installed are left alone; restored after."""
    if not _main_thread():
        yield
        return
    previous: dict[int, object] = {}

    def handler(signum, _frame):
        raise Terminated(signum)

    names = [*_CAUGHT_SIGNALS, "SIGINT"]
    for name in names:
        signum = getattr(signal, name, None)
        if signum is None or signal.getsignal(signum) is not signal.SIG_DFL:
            continue  # Python's SIGINT handler already raises KeyboardInterrupt
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def make_temp_dir(path: Path, kind: str = "tmp", restore: str | None = None) -> Path:
    """A new ``.<name>.<kind>-XXXX`` folder beside ``path`` holding the owner marker (so the
    next run can tell a killed run's leftover from a live one's); the output itself is written
    to its ``content`` subfolder, which never contains the marker."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{kind}-", dir=path.parent))
    owner = {**_owner(), "target": path.name, "restore": restore}
    (tmp / TMP_MARKER).write_text(json.dumps(owner) + "\n")
    return tmp


def _current_umask() -> int:
    """The process umask (read without changing it where /proc says it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(content: Path) -> None:
    """Give the output the modes a plain ``save_pretrained`` folder gets: the temporary folder
    is private (``mkdtemp``: 0700) and safetensors writes its files 0600, which would leave
    the weights unreadable to the user's group where the cards and configs are not."""
    umask = _current_umask()
    for item in [content, *content.rglob("*")]:
        if not item.is_symlink():
            public_file_mode(item, umask)


def public_file_mode(path: str | os.PathLike, umask: int | None = None) -> None:
    """Give one written file (0666) or folder (0777) the umask's mode (safetensors writes 0600,
    ``mkdtemp`` 0700)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~(_current_umask() if umask is None else umask))


def _swap_into_place(content: Path, path: Path) -> None:
    """Move ``content`` to ``path``; an existing ``path`` is moved aside first (into a marked
    folder that names it for restoring) and deleted last, and put back if the move fails, so
    the previous output survives any failure."""
    _apply_umask(content)
    if not path.exists():
        os.replace(content, path)
        return
    aside = make_temp_dir(path, "tmp-old", restore=path.name)
    try:
        os.replace(path, aside / CONTENT)
        try:
            os.replace(content, path)
        except BaseException:
            if not path.exists():
                os.replace(aside / CONTENT, path)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike, overwrite: bool = False, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move it to ``path`` only if the block succeeds.

    The temporary folder is removed on every exit Python sees: an exception, Ctrl-C, SIGTERM
    or SIGHUP (the last two end the process with ``Terminated``, exit code 128 + signal).
    """
    path = check_output_dir(path, overwrite, expected_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with unwind_on_signals():
        tmp = make_temp_dir(path, "tmp")
        try:
            content = tmp / CONTENT
            content.mkdir()
            yield content
            _swap_into_place(content, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
