"""File I/O shared by every command: atomic writes (a reader never sees a half-written result or
checkpoint) with the user's umask, write failures as one-line errors, and JSONL parsing with errors
that name file and line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class WriteError(OSError, ValueError):
    """A file or folder could not be written (disk full, no permission, a path that is a file).

    Its message is one line naming the path and the reason; as a ValueError the CLI prints it and
    exits 2, as an OSError ``except OSError`` still catches it.
    """

    @classmethod
    def of(cls, path: str | os.PathLike, exc: OSError) -> WriteError:
        if isinstance(exc, WriteError):
            return exc
        why = exc.strerror or str(exc)
        err = cls(f"cannot write {path}: {why}" + (f" (errno {exc.errno})" if exc.errno else ""))
        err.errno = exc.errno
        return err


def current_umask() -> int:
    """The process's umask, read without changing it (Linux /proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, mask: int | None = None) -> None:
    """Gives `path` (and, for a folder, everything in it) the modes a plain ``open``/``mkdir``
    would have given under the user's umask: files 0666 & ~umask, folders 0777 & ~umask.

    Temporary files (``tempfile.mkstemp``: 0600) and some writers' outputs are private
    otherwise, so that a model folder would be readable in parts only.
    """
    mask = current_umask() if mask is None else mask
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp_path)`` on a temporary file beside `path`, then renames it over `path`.

    The rename is atomic on POSIX: either the old file or the complete new one is visible. The
    file gets the user's umask (:func:`apply_umask`). On any error the temporary file is removed
    and the existing `path` is left untouched; an OSError (disk full, no permission, a folder
    where the file should be) is raised as :class:`WriteError` naming `path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise WriteError.of(path, exc) from exc
        raise
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Writes `obj` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    return atomic_write(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_figure(path: str | os.PathLike, fig, dpi: int = 110) -> Path:
    """Saves a matplotlib figure as PNG, atomically, and closes it (even if the save fails)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def parse_jsonl(text: str, path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of JSONL `text` read from `path`.

    Raises ValueError naming ``path:line`` for a malformed line or one that is not an object.
    """
    rows = []
    # Split on "\n" only: str.splitlines would also split at U+2028 and other characters that
    # JSON strings may hold unescaped.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows
