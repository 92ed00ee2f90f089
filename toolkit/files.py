"""Reading and writing files so that a folder cannot be turned against its owner.

Run folders are shared between people and machines. Whoever can place a symbolic link in
one (`history.jsonl -> ~/.bashrc`) must not make the owner's next gankit command write
through it. So every file gankit writes goes through this module:

- a file is replaced atomically: written to a fresh temporary file (created exclusively,
  which never follows a link), then renamed over the target (a rename replaces a link
  itself, never what it points to); a crash mid-write leaves the old file whole;
- an append opens with O_NOFOLLOW, so a link in its place is refused;
- a file that must not exist yet (`exists="refuse"`) is refused if anything, a link
  included, stands at its path; user-named outputs are written this way unless --force;
- `refuse_links` checks a whole folder before gankit works in it, so a linked
  sub-folder (`samples -> /etc`) is refused too.

Text and JSON that gankit reads (configs, histories, sidecars) go through `read_text` and
`parse_json`, which bound the size, refuse bytes that are not UTF-8 and nesting or numbers
that would exhaust the interpreter, each as one line.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from gankit.errors import UserError

Exists = Literal["replace", "refuse"]


def _mode() -> int:
    """The permissions a plain open() would give: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _mode()


class LinkRefused(UserError):
    pass


def read_text(path: Path, what: str, max_bytes: int) -> str:
    """A UTF-8 text file of at most `max_bytes`, never read through a link."""
    path = Path(path)
    if path.is_symlink():
        raise LinkRefused(f"{what} {path} is a symbolic link; gankit does not read through links")
    size = path.stat().st_size
    if size > max_bytes:
        raise UserError(f"{what} {path} is {size:,} bytes; gankit reads at most {max_bytes:,}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None


def parse_json(text: str, where: str):
    """JSON text -> value, with every way it can fail as one UserError line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not valid JSON: {err}") from None
    except RecursionError:
        raise UserError(f"{where} nests deeper than gankit reads") from None
    except ValueError as err:  # an integer of thousands of digits
        raise UserError(f"{where} holds a value gankit cannot read ({shorten(str(err))})") from None


def shorten(text: str, limit: int = 80) -> str:
    """A value as an error message shows it: never a 100 MB option echoed whole."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def refuse_links(folder: Path) -> None:
    """Refuse a folder that is, or holds anywhere below it, a symbolic link."""
    folder = Path(folder)
    if folder.is_symlink():
        raise LinkRefused(f"{folder} is a symbolic link; gankit does not work in linked folders "
                          "(use the folder it points to)")
    for parent, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            entry = Path(parent) / name
            if entry.is_symlink():
                raise LinkRefused(f"{entry} is a symbolic link; gankit never writes through links "
                                  f"in a run folder (remove it: rm '{entry}')")


def write_bytes(path: Path, data: bytes, exists: Exists = "replace") -> Path:
    """Write `data` to `path` atomically, never through a link."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exists == "replace":
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if anything, a dangling link too, is there
            except FileExistsError:
                raise UserError(f"{path} exists; gankit does not overwrite it (pass --force, "
                                "or choose another name)") from None
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str, exists: Exists = "replace") -> Path:
    return write_bytes(path, text.encode("utf-8"), exists)


def open_append(path: Path):
    """A text stream that appends to `path`; a link in its place is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError:
        if Path(path).is_symlink():
            raise LinkRefused(f"{path} is a symbolic link; gankit never writes through links "
                              f"(remove it: rm '{path}')") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def append_text(path: Path, text: str) -> None:
    with open_append(path) as f:
        f.write(text)


def make_folder(path: Path) -> Path:
    """Create `path` (and its parents) as a real folder; a link there is refused."""
    path = Path(path)
    if path.is_symlink():
        raise LinkRefused(f"{path} is a symbolic link; gankit does not write into linked folders")
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_path(path: Path, force: bool) -> Path:
    """A file the user named with --out: refused if it exists, unless --force."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise UserError(f"{path} exists; gankit does not overwrite it (pass --force, or choose "
                        "another name)")
    if path.is_symlink():
        raise LinkRefused(f"{path} is a symbolic link; gankit never writes through links "
                          f"(remove it: rm '{path}')")
    return path


def free_path(path: Path) -> Path:
    """`path`, or the first of path-2, path-3, ... that does not exist yet: a default output
    never replaces an earlier one."""
    path = Path(path)
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def figure_bytes(fig, **savefig_options) -> bytes:
    """A matplotlib figure as image bytes (the format from `format=`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, **savefig_options)
    return buffer.getvalue()


def save_figure(fig, path: Path, exists: Exists = "replace", **savefig_options) -> Path:
    path = Path(path)
    return write_bytes(path, figure_bytes(fig, format=path.suffix.lstrip(".").lower() or "png",
                                          **savefig_options), exists)


def grid_png(images, nrow: int) -> bytes:
    """A grid of [-1, 1] images as PNG bytes."""
    from torchvision.utils import save_image

    buffer = io.BytesIO()
    save_image(images, buffer, format="png", nrow=nrow, normalize=True, value_range=(-1, 1))
    return buffer.getvalue()

