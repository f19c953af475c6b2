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

    @staticmethod
    def predictions_name(cell_id: str) -> str:
        """The folder, beside the result, of the predictions a cell saves (``fishertune.runner.run``)."""
        return f"{cell_id}.pred"

    def predictions_dir(self, cell_id: str) -> Path:
        return self.dir / self.predictions_name(cell_id)

    def lock_path(self, cell_id: str) -> Path:
        return self.dir / "locks" / f"{cell_id}.lock"

    def checkpoint_path(self, cell_id: str) -> Path:
        return self.dir / "checkpoints" / f"{cell_id}.pt"

    def done(self, cell_id: str) -> bool:
        """A result exists: the cell finished (``done``) or stopped for good (``failed``); a file that is not
        a whole result is a :class:`UserError` (:func:`read_result`), never taken for one."""
        return self.read(cell_id) is not None

    def read(self, cell_id: str) -> dict[str, Any] | None:
        """The cell's result (checked: :func:`read_result`), or None when it has none."""
        path = self.path(cell_id)
        if not path.is_file():
            return None
        result = read_result(path)
        if result.get("cell_id") != cell_id:
            raise UserError(f"{path}: holds the result of cell {result.get('cell_id')!r}, not of {cell_id!r}; delete "
                            "it to rerun the cell")
        return result

    def status(self, cell_id: str) -> str | None:
        """``done``, ``failed`` or None (no result yet)."""
        r = self.read(cell_id)
        return None if r is None else r["status"]

    def write(self, cell_id: str, result: dict[str, Any]) -> Path:
        path = self.path(cell_id)
        atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True) + "\n")
        return path

    def check_writable(self) -> None:
        """Fail before any work when results cannot be written (exit 2, not a lost run), without creating
        anything: the nearest existing folder on the way to the results directory takes a probe file, which
        is removed at once (the folders are made when the first file is written)."""
        existing = self.dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, "Not a directory")
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".probe-"):
                pass
        except OSError as e:
            raise UserError(f"results directory {self.dir} is not writable ({e.strerror}); pass --results DIR") from None


#: the card of a kept or exported model (``runner.model.CARD_FILE``): a JSON file that is not a result
MODEL_CARD = "card.json"


#: what every result holds, by status (``fishertune.runner.run``): a file without it is not a result
RESULT_KEYS = {"done": ("manifest", "config", "targets", "aggregate", "params"), "failed": ("manifest", "failure")}


def read_result(path: Path) -> dict[str, Any]:
    """The result JSON at ``path``; a file that is not a whole result (not JSON, ``{}``, ``[]``, a status other
    than done or failed, a missing part) is a one-line :class:`UserError`, never taken for a finished cell."""
    fix = "delete it to rerun the cell"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a valid result file (not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a valid result file ({e.msg} at line {e.lineno}); {fix}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the result file ({e.strerror})") from None
    if not isinstance(result, dict):
        raise UserError(f"{path}: not a valid result file (a JSON {type(result).__name__}, not an object); {fix}")
    status = result.get("status")
    if status not in RESULT_KEYS:
        raise UserError(f"{path}: not a valid result file (status {status!r}, expected done or failed); {fix}")
    missing = [key for key in RESULT_KEYS[status] if key not in result]
    if missing or not isinstance(result["manifest"], dict):
        raise UserError(f"{path}: not a valid result file (no {(missing or ['manifest'])[0]!r}); {fix}")
    return result


def iter_results(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every result JSON under ``root`` (recursively, checked: :func:`read_result`), with its path; model
    cards are not results."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"results directory {root} does not exist; run `fishertune run MANIFEST` first or pass --results DIR")
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith(".") or path.name == MODEL_CARD:
            continue
        yield path, read_result(path)
