"""Reading the weights of a TorchScript archive without running it.

Some official checkpoints (OpenAI's CLIP ``ViT-L-14.pt``) are TorchScript archives written by
``torch.jit.save``. ``torch.jit.load`` would compile and run the archive's ``code/``; this reader
never looks at the code. An archive is a zip with one top folder ``<prefix>/`` holding ``data.pkl``
(the pickled module tree), ``constants.pkl``, ``code/...`` and one ``data/<key>`` entry per tensor
storage. ``data.pkl`` is unpickled with a restricted unpickler that knows only:

- the tensor rebuild function ``torch._utils._rebuild_tensor_v2`` and the typed storage names
  (``torch.FloatStorage``, ``torch.HalfStorage``, ...) that say a storage's dtype; storages are read
  from the zip's ``data/`` entries (``persistent_load``), never by torch's own unpickling;
- plain value constructors torch's TorchScript pickler uses: ``collections.OrderedDict``, the
  ``torch.jit._pickle`` list builders and ``restore_type_tag`` (identity functions here),
  ``torch.device`` and ``builtins.complex``;
- ``__torch__.*`` classes (the scripted modules), each replaced by an inert placeholder that records
  the attribute dictionary it is given.

Any other global (``os.system``, ``builtins.print``, ...) stops the read with a :class:`UserError`
saying the file carries objects other than tensors, before anything is called. The flat state dict is
the placeholder tree walked from the root: a tensor attribute is a parameter or buffer (named by its
path, e.g. ``visual.conv1.weight``), a placeholder attribute a submodule; flags such as ``training``
and other non-tensor attributes are skipped. This equals ``torch.jit.load(path).state_dict()`` for
traced and scripted ``nn.Module`` trees (tests/test_backbone_clip.py checks it); a scripted module's
tensor attribute that is neither a parameter nor a buffer would also be returned (the archive says
which is which only in its code, which is not read).
"""

from __future__ import annotations

import collections
import pickle
import sys
import zipfile
from pathlib import Path

import torch

from fishertune.errors import UserError

#: the legacy typed storage names a TorchScript pickle uses to say a storage's dtype
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


def _identity(value, *_):
    return value


#: ``torch.jit._pickle`` helpers: they return their argument (the type tag only matters to the JIT)
_JIT_PICKLE = {name: _identity for name in (
    "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_tensor_from_id",
    "restore_type_tag")}


class _Forbidden(Exception):
    """A global outside the allowed set was referenced."""


class _Unreadable(Exception):
    """The archive's structure is damaged (missing or short storage, bad tensor geometry)."""


class _StorageType:
    """Stands for ``torch.<X>Storage`` in the pickle: only its dtype is used."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class ScriptObject:
    """Inert stand-in for a ``__torch__.*`` object: records the state the pickle gives it."""

    qualified_name = "__torch__"

    def __init__(self, *args, **kwargs):  # a REDUCE on the class builds an empty placeholder
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def attributes(self) -> dict:
        return self.state if isinstance(self.state, dict) else {}


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` on a flat storage tensor, bounds-checked."""
    if not isinstance(storage, torch.Tensor):
        raise _Unreadable("a tensor without storage")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in (*size, *stride, storage_offset))):
        raise _Unreadable("a tensor with malformed geometry")
    if all(s > 0 for s in size):
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= storage.numel():
            raise _Unreadable(f"a tensor reaches element {last} of a storage of {storage.numel()}")
    return storage.as_strided(size, stride, storage_offset)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, meta: bool = False):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.meta = meta  # storages as meta tensors, sized from the zip directory, their data not read
        self.storages: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (ScriptObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _JIT_PICKLE:
            return _JIT_PICKLE[name]
        if module == "torch" and name == "device":
            return torch.device
        if module == "builtins" and name == "complex":
            return complex
        raise _Forbidden(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Unreadable(f"an unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype
        if (key, dtype) not in self.storages:
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            name = f"{self.prefix}/data/{key}"
            try:
                size = self.archive.getinfo(name).file_size
            except KeyError:
                raise _Unreadable(f"storage {name} is missing") from None
            if numel < 0 or size < nbytes:
                raise _Unreadable(f"storage {name} holds {size} bytes, {nbytes} expected")
            if self.meta:
                self.storages[key, dtype] = torch.empty(numel, dtype=dtype, device="meta")
            elif nbytes == 0:
                self.storages[key, dtype] = torch.empty(0, dtype=dtype)
            else:
                raw = self.archive.read(name)
                self.storages[key, dtype] = torch.frombuffer(bytearray(memoryview(raw)[:nbytes]), dtype=dtype)
        return self.storages[key, dtype]


def _flatten(obj: ScriptObject, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in obj.attributes().items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            _flatten(value, f"{prefix}{name}.", out, seen)


def archive_prefix(names: list[str]) -> str | None:
    """The top folder of a TorchScript archive (``<prefix>/data.pkl`` beside ``constants.pkl`` or
    ``code/``), or None when the zip is not one."""
    tops = {n.split("/", 1)[0] for n in names if n.count("/") >= 1 and n.split("/", 1)[1] == "data.pkl"}
    for top in sorted(tops):
        if f"{top}/constants.pkl" in names or any(n.startswith(f"{top}/code/") for n in names):
            return top
    return None


def is_torchscript_archive(path: Path) -> bool:
    """True when ``path`` is a zip laid out as ``torch.jit.save`` writes it (``constants.pkl``/``code/``)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return archive_prefix(archive.namelist()) is not None
    except (OSError, zipfile.BadZipFile):
        return False


def read_torchscript_state_dict(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive ``path``, read without running its code.

    Returns what ``torch.jit.load(path).state_dict()`` would, on the CPU, in the stored dtypes; with
    ``meta``, as meta tensors (names, shapes, dtypes), the storages' sizes checked against the zip
    directory and their data not read. Raises
    :class:`UserError` (one line naming the file) when the archive references anything but tensors and
    scripted-module placeholders, or is damaged.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = archive_prefix(archive.namelist())
            if prefix is None:
                raise _Unreadable("no <archive>/data.pkl beside constants.pkl or code/")
            byteorder = f"{prefix}/byteorder"
            if byteorder in archive.namelist():
                order = archive.read(byteorder).decode(errors="replace").strip()
                if order != sys.byteorder:
                    raise _Unreadable(f"its tensors are stored {order}-endian, this machine is {sys.byteorder}-endian")
            with archive.open(f"{prefix}/data.pkl") as f:
                root = _RestrictedUnpickler(f, archive, prefix, meta).load()
    except _Forbidden as e:
        raise UserError(
            f"checkpoint {path} carries objects other than tensors and was not loaded (it references {e}); "
            "use the official weights file or a .safetensors export"
        ) from None
    except (_Unreadable, pickle.UnpicklingError, zipfile.BadZipFile, OSError, EOFError, ValueError, TypeError,
            RuntimeError, KeyError, IndexError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} cannot be read ({first}); the file may be truncated: download it again"
        ) from None
    if not isinstance(root, ScriptObject):
        raise UserError(f"checkpoint {path} is a TorchScript archive without a module; is it a weights file?")
    state: dict[str, torch.Tensor] = {}
    _flatten(root, "", state, set())
    if not state:
        raise UserError(f"checkpoint {path} is a TorchScript archive without tensors; is it a weights file?")
    return state
