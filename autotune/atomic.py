"""All-or-nothing output files and folders: checked before any work, written to a temporary
name beside the target, then renamed into place (a crash or Ctrl-C leaves the old file or
nothing, never half a file)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from autotune.errors import UserError


def check_out_file(path: str | os.PathLike, flag: str = "--out", *, force: bool = False) -> Path:
    """``path`` as a Path once its folder exists and is writable, and it is a new file (or
    ``force``): UserError, one line, if not. A SQLite database is never replaced."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name")
    if out.exists():
        with out.open("rb") as fh:
            if fh.read(16) == b"SQLite format 3\x00":
                # A report or an export must never replace a study database (perhaps the
                # very one it was read from), --force or not.
                raise UserError(f"{flag} {out} is a SQLite database (a study's?); "
                                "pick another file name")
        if not force:
            raise UserError(f"{flag} {out} exists; pick another file name or pass --force "
                            "to replace it")
    _check_writable_folder(out.parent if str(out.parent) else Path("."), flag, out)
    return out


def check_out_dir(path: str | os.PathLike, flag: str = "--out", *,
                  names: Iterable[str] = (), force: bool = False) -> Path:
    """``path`` as a Path for a folder to fill with ``names``.

    It may not exist yet (its parent must be writable), or be empty; an existing folder with
    other content is refused unless ``force`` (then only ``names`` are replaced).
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; give a folder")
    if out.is_dir():
        _check_writable_folder(out, flag, out)
        present = sorted(p.name for p in out.iterdir())
        if present and not force:
            raise UserError(f"{flag} {out} is not empty ({', '.join(present[:4])}"
                            f"{', …' if len(present) > 4 else ''}); pick a new folder or pass "
                            "--force to replace autotune's files in it")
    else:
        _check_writable_folder(out.parent if str(out.parent) else Path("."), flag, out)
    return out


def check_folder(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a Path for a folder to write files into: an existing writable folder, or
    one that can be created (its parent exists and is writable)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; give a folder")
    if out.is_dir():
        _check_writable_folder(out, flag, out)
    else:
        _check_writable_folder(out.parent if str(out.parent) else Path("."), flag, out)
    return out


def _check_writable_folder(folder: Path, flag: str, target: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"cannot write {flag} {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {target}: folder {folder} is not writable")


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    write_file(path, lambda tmp: tmp.write_text(text))
    os.chmod(path, mode)


def write_folder(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Write ``files`` (name -> (content, mode)) into the folder ``out``.

    A new (or empty) folder is assembled under a temporary name and renamed into place, so it
    appears complete or not at all; in an existing folder (``--force``) each file is replaced
    atomically and other files are left alone.
    """
    parent = out.parent if str(out.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, (content, mode) in files.items():
            target = staging / name
            target.write_bytes(content)
            os.chmod(target, mode)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.chmod(staging, 0o755)
            os.replace(staging, out)
            return
        for name in files:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "check_folder", "check_out_dir", "check_out_file", "write_file", "write_folder", "write_text",
]
