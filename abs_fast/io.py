"""Files: atomic writes (a reader, or a run interrupted mid-write, sees the old content or the new,
never a half-written file); reads that name the file in every error; run directories that a run
owns (a marker) and holds (an exclusive lock) for as long as it writes into them."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "RUN_MARKER",
    "RunDirectory",
    "RunDirectoryError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_text",
    "expect_file",
    "figure_png",
    "open_safetensors",
    "read_json",
    "read_safetensors",
    "read_text",
    "remove_stale_staging",
    "replace_directory",
    "save_safetensors",
    "shorten",
]


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def replace_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; when the block succeeds, the staging
    directory becomes `target` (an old `target` is moved aside first and then deleted). When the
    block raises, `target` is untouched and the staging directory is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        for f in staging.iterdir():
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "dir")
        os.replace(staging, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with any failure (a full disk: safetensors raises its own error type, not an
    OSError) reported as an OSError that names the file and what to do."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as err:
        raise OSError(errno.EIO, f"cannot write {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__} "
                      "(is the disk full? free some space; the previous checkpoint is intact)", str(path)) from None


def figure_png(fig, path: str | Path | None = None) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards), also written atomically to `path`."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    data = buffer.getvalue()
    if path is not None:
        atomic_write_bytes(Path(path), data)
    return data


# --- reads that name the file -------------------------------------------------------------------

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def expect_file(path: str | Path, what: str = "file") -> None:
    """A path that is not a regular file is an error that says what it is (missing, a directory, a
    symbolic link loop, a FIFO, a device, a socket), checked before anything opens it, so a pipe
    can never block a read."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{what} {path} does not exist", str(path)) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{what} {path} is a symbolic link loop", str(path)) from None
        raise
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, f"{what} {path} is a directory; expected a file", str(path))
    for test, kind in _KINDS:
        if test(mode):
            raise OSError(errno.EINVAL, f"{what} {path} is {kind}; expected a regular file", str(path))


def shorten(value: object, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_text(text: str, where: str) -> str:
    """Text that every later step can encode: no NUL byte and no lone surrogate (which the JSON
    escape \\ud800 can produce); an error names `where` and the line and column."""
    if "\x00" in text:
        _text_error(text, text.index("\x00"), "a NUL byte", where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = (f"a byte 0x{code - 0xDC00:02x} that is not UTF-8 (a name from another encoding)"
                if 0xDC80 <= code <= 0xDCFF else "a lone surrogate (not a character)")  # surrogateescape'd
        _text_error(text, err.start, what, where)
    return text


def _text_error(text: str, position: int, what: str, where: str):
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    raise ValueError(f"{where}: line {line}, column {column}: {what}; remove it")


def read_text(path: str | Path, what: str = "file") -> str:
    """UTF-8 text of `path`; a directory, a missing file or bytes that are not UTF-8 are errors naming it."""
    path = Path(path)
    expect_file(path, what)
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte order mark is not part of the text
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def read_json(path: str | Path, what: str = "file"):
    """The JSON value in `path`; invalid JSON is an error naming the file and line."""
    import json as _json

    try:
        return _json.loads(read_text(path, what))
    except _json.JSONDecodeError as err:
        raise ValueError(f"{what} {path}:{err.lineno}: not valid JSON ({err.msg})") from None


def _safetensors_error(path: Path, err: Exception, what: str) -> ValueError:
    return ValueError(f"{what} {path}: not a readable safetensors file ({err}); the file is truncated or "
                      f"corrupt: copy it again")


@contextlib.contextmanager
def open_safetensors(path: str | Path, what: str = "weights file"):
    """safetensors.safe_open on CPU, with a truncated or corrupt file reported by name."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    expect_file(path, what)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise _safetensors_error(path, err, what) from None
    with handle as f:
        yield _NamedSafetensors(f, path, what)


class _NamedSafetensors:
    """A safe_open handle whose tensor reads name the file when they fail."""

    def __init__(self, handle, path: Path, what: str):
        self._handle, self._path, self._what = handle, path, what

    def keys(self):
        return self._handle.keys()

    def metadata(self):
        return self._handle.metadata()

    def get_tensor(self, name: str):
        from safetensors import SafetensorError

        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{self._what} {self._path}: tensor {name!r} cannot be read ({err}); the file is "
                             "truncated or corrupt") from None

    def get_slice(self, name: str):
        return self._handle.get_slice(name)


def read_safetensors(path: str | Path, what: str = "weights file") -> dict:
    """Every tensor of a safetensors file (CPU), errors naming the file."""
    with open_safetensors(path, what) as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a mapping)


# --- run directories: owned (a marker) and held (a lock) ------------------------------------------

RUN_MARKER = ".abs-fast-run"
_LOCK_NAME = ".abs-fast-lock"
_HELD: dict[str, tuple[int, int]] = {}  # run directories this process holds: (lock fd, claims)


class RunDirectoryError(ValueError):
    """A run directory that this run may not write into (another program's, another kind of run's, or
    one that another process holds)."""


def _legacy_run(path: Path) -> bool:
    """A run written before markers existed: config.json of train keys beside checkpoints/ or metrics."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"kl_beta", "mode", "seeds"} <= set(config) and (
        (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


class RunDirectory:
    """The directory a command writes into, claimed for the whole run.

    It must be new, empty, or hold an abs-fast run marker of the same `kind` (a demo replaces only an
    earlier demo; train continues only a train run). An exclusive fcntl lock is held until close():
    a second process is refused at once and told the holder's PID. Nothing is written into a
    directory that fails these checks."""

    def __init__(self, path: str | Path, kind: str, what: str = "--output"):
        self.path, self.kind = Path(path), kind
        self._key: str | None = None
        self._made: Path | None = None  # the outermost directory claim() created (None: it existed)
        self._was_empty = False
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"{what} {self.path} is a file; expected a directory (new, empty, or an earlier "
                                    f"abs-fast {kind} run)")
        marker = self.marker()
        foreign = marker is None and self.path.is_dir() and any(self.path.iterdir())
        if foreign and not (kind == "train" and _legacy_run(self.path)):
            names = sorted(p.name for p in self.path.iterdir())
            raise RunDirectoryError(f"{what} {self.path} holds files that are not an abs-fast run ("
                                    f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); abs-fast writes "
                                    "only into a new or empty directory or its own run: choose another")
        if marker is not None and marker.get("kind") != kind:
            raise RunDirectoryError(f"{what} {self.path} holds an abs-fast {marker.get('kind')} run, not a {kind} run; "
                                    "choose another directory")

    def marker(self) -> dict | None:
        try:
            value = json.loads((self.path / RUN_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else {"kind": None}

    def claim(self) -> RunDirectory:
        """Create the directory (and its marker), take the lock; raises RunDirectoryError when another
        process holds it. Within one process a second claim shares the first's lock (counted)."""
        if self._key is not None:  # this object holds it already
            return self
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._made = missing[-1] if missing else None
        self._was_empty = not missing and not any(self.path.iterdir())
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            key = os.path.realpath(self.path)
        except OSError as err:
            raise RunDirectoryError(f"cannot write into {self.path}: {err.strerror}") from None
        if key in _HELD:
            fd, count = _HELD[key]
            _HELD[key] = (fd, count + 1)
        else:
            try:  # never through a symbolic link: the lock is ours, whatever the link points at is not
                fd = os.open(self.path / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise RunDirectoryError(f"{self.path / _LOCK_NAME} is a symbolic link; abs-fast writes its lock "
                                            "only into a file of its own: remove the link") from None
                raise RunDirectoryError(f"cannot write into {self.path}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirectoryError(f"{self.path} is in use by another abs-fast process (PID {holder}); wait for "
                                        "it to finish or choose another directory") from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as err:
                os.close(fd)
                raise RunDirectoryError(f"cannot write {self.path / _LOCK_NAME}: {err.strerror} (free some disk "
                                        "space, or choose another directory)") from None
            _HELD[key] = (fd, 1)
        self._key = key
        if self.marker() is None:
            atomic_write_text(self.path / RUN_MARKER, json.dumps(
                {"kind": self.kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        return self

    def close(self, failed: bool = False) -> None:
        """Release the lock. failed=True (the command stopped with an error): a directory that was new
        or empty before claim() and still holds nothing but the marker and the lock is left as it was
        found (removed, or emptied), so a failed command leaves nothing behind."""
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        fd, count = _HELD[key]
        if count > 1:
            _HELD[key] = (fd, count - 1)
            return
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the lock
        if failed and (self._made is not None or self._was_empty):
            self._undo_claim()

    def _undo_claim(self) -> None:
        try:
            if {p.name for p in self.path.iterdir()} - {RUN_MARKER, _LOCK_NAME}:
                return  # the command wrote something: kept
            for name in (RUN_MARKER, _LOCK_NAME):
                (self.path / name).unlink(missing_ok=True)
            if self._made is not None:
                for directory in (self.path, *self.path.parents):
                    directory.rmdir()
                    if directory == self._made:
                        break
        except OSError:
            pass  # best effort: what is left is only empty directories or our marker

    def __enter__(self) -> RunDirectory:
        return self.claim()

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


def remove_stale_staging(directory: str | Path) -> list[Path]:
    """Remove what replace_directory and atomic writes leave behind when a process is killed mid-write
    (.NAME.staging-*, .NAME.old-*, .NAME.*.tmp) in `directory`. Call it only while holding the run's lock."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        name = entry.name
        if name.startswith(".") and (".staging-" in name or ".old-" in name or name.endswith(".tmp")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
