"""Results store: one JSON file per finished cell, written atomically.

``<results>/<manifest name>/<cell id>.json``. A result is written to a temporary file in the same
directory, flushed to disk and renamed into place, so a reader never sees half a file and a killed
run leaves either the whole result or none. A cell whose result exists is done and is skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from fishertune.errors import UserError


_UMASK = os.umask(0o022)  # the process umask, read once (and set back at once)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: ``path`` is always
    absent, old or complete (a killed run leaves nothing half-written). The file gets the usual
    permissions (mkstemp's are 0600). A full disk or an unwritable directory is a one-line user error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); choose a writable directory") from None
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({e.strerror}); free some space or choose another directory") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`), flushed to disk before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


class ResultStore:
    def __init__(self, root: str | Path, manifest_name: str):
        self.root = Path(root)
        self.dir = self.root / manifest_name

    def path(self, cell_id: str) -> Path:
        return self.dir / f"{cell_id}.json"

    def lock_path(self, cell_id: str) -> Path:
        return self.dir / "locks" / f"{cell_id}.lock"

    def checkpoint_path(self, cell_id: str) -> Path:
        return self.dir / "checkpoints" / f"{cell_id}.pt"

    def done(self, cell_id: str) -> bool:
        """A result exists: the cell finished (``done``) or stopped for good (``failed``)."""
        return self.path(cell_id).is_file()

    def read(self, cell_id: str) -> dict[str, Any] | None:
        path = self.path(cell_id)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not a valid result file ({e.msg} at line {e.lineno}); delete it to rerun "
                            "the cell") from None

    def status(self, cell_id: str) -> str | None:
        """``done``, ``failed`` or None (no result yet)."""
        r = self.read(cell_id)
        return None if r is None else r.get("status", "done")

    def write(self, cell_id: str, result: dict[str, Any]) -> Path:
        path = self.path(cell_id)
        atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True) + "\n")
        return path

    def check_writable(self) -> None:
        """Fail before any work when results cannot be written (exit 2, not a lost run)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".probe-"):
                pass
        except OSError as e:
            raise UserError(f"results directory {self.dir} is not writable ({e.strerror}); pass --results DIR") from None


#: the card of a kept or exported model (``runner.model.CARD_FILE``): a JSON file that is not a result
MODEL_CARD = "card.json"


def iter_results(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every result JSON under ``root`` (recursively), with its path; model cards are not results."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"results directory {root} does not exist; run `fishertune run MANIFEST` first or pass --results DIR")
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith(".") or path.name == MODEL_CARD:
            continue
        try:
            yield path, json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not a valid result file ({e.msg} at line {e.lineno}); delete it to rerun the cell") from None
