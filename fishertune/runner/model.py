"""The trained model of a cell, kept: what trained plus the head, as safetensors, with a card.

When a cell finishes, ``<results>/<results name>/<cell id>.model/`` receives

* ``model.safetensors``: only what the cell trained. Every parameter that trains densely under its
  name (LoRA's factors, adapters, prompt and query tokens, Rein's tokens and MLPs, the whole backbone
  for Full) and the decode head (it always trains). A parameter that trains at chosen elements only
  (ChildTune, FisherTune and its ablation rows: a method's ``sparse_indices``) is a delta against the
  pretrained weights: ``<name>@indices`` (the flat indices of the elements that trained, int32 below
  2^31 elements) and ``<name>@values`` (their trained values; every other element is the pretrained
  one, since the sparse optimizer never touches it). Values are stored, not differences, so the
  rebuilt model is bit for bit the trained one. Persistent buffers are kept as well (the shipped
  models have none).
* ``card.json``: the cell config, where the frozen weights come from, the metrics, git commit, package
  versions, device and how the cell evaluated (window, stride, test sizes, precision, threads).

Where the frozen weights come from is resolved exactly as the runner resolves them
(:func:`pretrained_file`, through ``backbones.registry.weights_path``): a file (its name, size and
sha256, cached per path, size and modification time, since hashing a multi-GB file takes seconds; the
tiny foundation models' shipped files included) or, for a build without one (``pretrained: false``),
random initialisation from the cell's seed. In both cases the card also holds the sha256 of the backbone's
state as built, before the method (:func:`state_sha256`), which catches a rebuild that no longer
gives the weights the cell started from.

:func:`load_model` rebuilds the model from a card (the same :func:`build_segmentor` the runner uses),
refuses a pretrained file that differs from the recorded one (size or hash) in one line, and loads the
kept state; ``fishertune predict`` runs it, ``fishertune export`` copies the two files with a README.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.backbones.registry import weights_path
from fishertune.backbones.weights import file_sha256
from fishertune.data import NUM_CLASSES
from fishertune.errors import UserError
from fishertune.heads import build_head
from fishertune.precision import compute_dtype
from fishertune.runner.data import cache_dir
from fishertune.runner.store import MODEL_CARD, atomic_write, atomic_write_text, iter_results, read_result
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, TuningMethod, build_method

MODEL_FORMAT = "fishertune-model"
MODEL_VERSION = 1
MODEL_FILE = "model.safetensors"
#: the card's file name (``runner.store.iter_results`` never takes a file of this name for a result)
CARD_FILE = MODEL_CARD
README_FILE = "README.md"
INDICES, VALUES = "@indices", "@values"
#: bytes of an index of a sparse parameter below 2**31 elements (int32) and of a float32 value
INDEX_BYTES = 4


def model_dir(result_path: Path) -> Path:
    """``<cell id>.model/`` beside the result ``<cell id>.json``."""
    result_path = Path(result_path)
    return result_path.with_name(f"{result_path.stem}.model")


# ------------------------------------------------------------------------------------ building


def build_segmentor(config: dict[str, Any], weights: str | os.PathLike | None, device: torch.device,
                    ctx: MethodContext, where: str = "", digest: bool = False
                    ) -> tuple[Segmentor, TuningMethod, str | None]:
    """The model of a cell ``config`` before training, as every cell is built: the backbone (from
    ``weights`` or ``$FISHERTUNE_WEIGHTS`` when the config is pretrained and the variant has a file,
    else drawn from the seed), the head initialised from the seed right after it, the method applied
    with ``ctx``; the decode head trains. With ``digest``, also :func:`state_sha256` of the backbone as
    built (before the method). The head and the method's modules draw from torch's global stream in
    this order, so a cell's model before training depends on its config alone."""
    backbone = build_backbone(config["backbone"], weights=weights, pretrained=config["pretrained"],
                              seed=config["seed"], where=f"{where}: backbones", img_size=config["train"]["crop_size"])
    built = state_sha256(backbone.state_dict()) if digest else None
    torch.manual_seed(config["seed"])
    head = build_head(config["head"]["name"], backbone.embed_dim, NUM_CLASSES, where=f"{where}: head",
                      **config["head"]["config"])
    segmentor = Segmentor(backbone, head).to(device)
    method = build_method(config["method"], config["method_config"], f"{where}: methods")
    method.apply(segmentor, ctx)
    segmentor.head.requires_grad_(True)
    return segmentor, method, built


def pretrained_file(config: dict[str, Any], explicit: str | os.PathLike | None) -> Path | None:
    """The pretrained file a cell ``config`` is built from (``explicit``, the package's own file of a tiny
    model, or ``$FISHERTUNE_WEIGHTS``: ``backbones.registry.weights_path``, as the runner resolves it), or
    None when its backbone is drawn from the seed."""
    return weights_path(BACKBONES.get(config["backbone"]), explicit) if config["pretrained"] else None


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict: every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a file's bytes (``backbones.weights.file_sha256``), cached under
    ``$FISHERTUNE_CACHE/sha256/`` by its path, size and modification time (a multi-GB checkpoint takes
    seconds to hash, and every cell of a sweep records it; a changed file gets a new key)."""
    path = Path(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = cache_dir() / "sha256" / f"{key}.txt"
    if cached.is_file():
        return cached.read_text().strip()
    digest = file_sha256(path)
    try:
        atomic_write_text(cached, digest + "\n")
    except UserError:
        pass  # an unwritable cache costs the next hash its time, nothing else
    return digest


def pretrained_record(config: dict[str, Any], path: Path | None, built: str) -> dict[str, Any]:
    """The card's ``pretrained`` entry: the file (name, path, bytes, sha256) or the seed it was drawn
    from, and the sha256 of the backbone as built (:func:`state_sha256`)."""
    if path is None:
        return {"file": None, "init": "random", "seed": config["seed"], "state_sha256": built}
    return {**file_record(path), "state_sha256": built}


def file_record(path: Path) -> dict[str, Any]:
    """A pretrained file as a result and a card record it: name, resolved path, bytes, sha256."""
    return {"file": path.name, "path": str(Path(path).resolve()), "bytes": path.stat().st_size,
            "sha256": cached_sha256(path)}


# ------------------------------------------------------------------------------------ keeping


def kept_tensors(segmentor: torch.nn.Module, method: TuningMethod) -> dict[str, torch.Tensor]:
    """What a kept model holds (module docstring): dense trained parameters and the head under their
    names, sparse ones as ``@indices`` / ``@values``, persistent buffers. Call after training."""
    sparse = method.sparse_indices(segmentor)
    persistent = set(segmentor.state_dict(keep_vars=True))
    out: dict[str, torch.Tensor] = {}
    for name, p in segmentor.named_parameters():
        if not p.requires_grad:
            continue
        value = p.detach().cpu()
        if name in sparse:
            idx = sparse[name].detach().cpu().long()
            out[name + INDICES] = idx.to(torch.int32 if p.numel() < 2**31 else torch.int64)
            out[name + VALUES] = value.reshape(-1)[idx].contiguous()
        else:
            out[name] = value.contiguous()
    for name, b in segmentor.named_buffers():
        if name in persistent:
            out[name] = b.detach().cpu().contiguous()
    return out


def kept_bytes(segmentor: torch.nn.Module, method: TuningMethod) -> int:
    """Bytes of tensor data in the kept file of ``method`` on ``segmentor`` (the file adds a header of
    a few hundred bytes per tensor), from the counts, so that it works on the meta device where a
    sparse method has not chosen its elements yet: every trainable parameter outside the backbone (the
    head) and every persistent buffer at its element size; on the backbone side, when the method's
    trainable count (the paper's column) is below the elements that get gradients, it trains that many
    chosen elements (value + int32 index each), else every such element densely."""
    trainable = [p for p in segmentor.parameters() if p.requires_grad]
    own = {id(p) for p in segmentor.backbone.parameters()}
    total = sum(p.numel() * p.element_size() for p in trainable if id(p) not in own)
    backbone = [p for p in trainable if id(p) in own]
    dense = sum(p.numel() for p in backbone)
    counted = method.trainable_backbone_params(segmentor)
    size = backbone[0].element_size() if backbone else 4
    total += counted * (size + INDEX_BYTES) if counted < dense else dense * size
    persistent = set(segmentor.state_dict(keep_vars=True))
    return total + sum(b.numel() * b.element_size() for n, b in segmentor.named_buffers() if n in persistent)


def save_model(folder: Path, segmentor: torch.nn.Module, method: TuningMethod, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``model.safetensors`` and ``card.json`` (``card`` plus the ``kept`` entry) into ``folder``,
    each atomically; returns the ``kept`` entry (file, bytes, sha256, elements), which the result
    records as its ``model``."""
    from safetensors.torch import save_file

    tensors = kept_tensors(segmentor, method)
    path = Path(folder) / MODEL_FILE
    metadata = {"format": MODEL_FORMAT, "version": str(MODEL_VERSION), "cell_id": str(card.get("cell_id"))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    kept = {"file": MODEL_FILE, "bytes": path.stat().st_size, "sha256": file_sha256(path), "tensors": len(tensors),
            "dense_elements": sum(t.numel() for n, t in tensors.items() if not n.endswith((INDICES, VALUES))),
            "sparse_elements": sum(t.numel() for n, t in tensors.items() if n.endswith(VALUES))}
    atomic_write_text(Path(folder) / CARD_FILE, json.dumps({**card, "kept": kept}, indent=1, sort_keys=True) + "\n")
    return kept


# ------------------------------------------------------------------------------------ loading


def read_card(model: Path) -> dict[str, Any]:
    """The card of a kept or exported model directory; a missing or foreign one is a user error."""
    model = Path(model)
    card_path = model / CARD_FILE
    if not model.is_dir() or not card_path.is_file() or not (model / MODEL_FILE).is_file():
        raise UserError(f"{model}: not a kept model (a directory with {CARD_FILE} and {MODEL_FILE}); give a "
                        f"`fishertune export` package or a cell's <cell id>.model directory")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{card_path}: not a valid model card ({e}); export the model again") from None
    if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
        raise UserError(f"{card_path}: not a fishertune model card; export the model again")
    if card.get("version") != MODEL_VERSION:
        raise UserError(f"{card_path}: model card version {card.get('version')}, this fishertune-bench reads "
                        f"version {MODEL_VERSION}; use the version of fishertune-bench that wrote it "
                        f"(commit {card.get('git', {}).get('commit')})")
    return card


def _pretrained_source(card: dict[str, Any], explicit: str | os.PathLike | None, where: Path) -> Path | None:
    """The pretrained file to rebuild the card's model from (:func:`pretrained_file`), or None for a
    backbone drawn from the seed; refused in one line when it is not the kind of source, or not the
    file (size, then sha256), the model was trained on."""
    rec = card["pretrained"]
    config = card["config"]
    backbone = config["backbone"]
    commit = (card.get("git") or {}).get("commit")
    spec = BACKBONES.get(backbone, f"{where}: backbone")
    has_file = bool(spec.weights and config["pretrained"])
    if rec["file"] is None and has_file:
        raise UserError(f"{where}: this model was trained on {backbone} drawn at random from seed {rec['seed']}, "
                        f"but this version of fishertune-bench builds {backbone} from the pretrained file "
                        f"{spec.weights}; its predictions would differ: use the fishertune-bench it was trained "
                        f"with (commit {commit})")
    if rec["file"] is not None and not has_file:
        raise UserError(f"{where}: this model was trained on {backbone} from the pretrained file {rec['file']}, "
                        f"but this version of fishertune-bench builds {backbone} without a file; use the "
                        f"fishertune-bench it was trained with (commit {commit})")
    if not has_file:
        return None
    path = pretrained_file(config, explicit)
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise UserError(f"{where}: the pretrained file {path} has {size:,} bytes, but the model was trained on "
                        f"{rec['file']} of {rec['bytes']:,} bytes; pass the file it was trained on with --weights "
                        f"(sha256 {rec['sha256']})")
    digest = cached_sha256(path)
    if digest != rec["sha256"]:
        raise UserError(f"{where}: the pretrained file {path} has sha256 {digest}, but the model was trained on "
                        f"{rec['file']} with sha256 {rec['sha256']}; pass the file it was trained on with --weights")
    return path


def load_kept(segmentor: torch.nn.Module, path: Path) -> None:
    """Put a kept ``model.safetensors`` into a rebuilt ``segmentor`` (method applied): every trainable
    parameter and persistent buffer must be there, densely or as indices + values, and nothing else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or not a safetensors file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable kept model ({first[:200]}); export the model again") from None
    if meta.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a fishertune kept model (no {MODEL_FORMAT} metadata); export the model again")
    persistent = set(segmentor.state_dict(keep_vars=True))
    expected = {n: p for n, p in segmentor.named_parameters() if p.requires_grad}
    expected.update({n: b for n, b in segmentor.named_buffers() if n in persistent})
    missing = [n for n in expected if n not in tensors and not (n + INDICES in tensors and n + VALUES in tensors)]
    used = {k for n in expected for k in (n, n + INDICES, n + VALUES)}
    extra = sorted(set(tensors) - used)
    if missing or extra:
        raise UserError(f"{path}: the kept model does not fit the model its card describes ({len(missing)} "
                        f"missing, {len(extra)} unexpected entries, e.g. {(missing or extra)[0]!r}); it was "
                        "written by another version of fishertune-bench")
    with torch.no_grad():
        for name, target in expected.items():
            if name in tensors:
                value = tensors[name]
                if value.shape != target.shape:
                    raise UserError(f"{path}: {name} has shape {tuple(value.shape)} in the kept model, "
                                    f"{tuple(target.shape)} in the rebuilt one; it was written by another version")
                target.copy_(value)
                continue
            idx, values = tensors[name + INDICES].long(), tensors[name + VALUES]
            outside = bool(idx.numel()) and (int(idx.min()) < 0 or int(idx.max()) >= target.numel())
            if idx.ndim != 1 or idx.shape != values.shape or outside:
                raise UserError(f"{path}: the indices of {name} do not fit its {target.numel():,} elements")
            target.view(-1).index_copy_(0, idx.to(target.device), values.to(target.device, target.dtype))


Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_model(model: Path, device: torch.device, weights: str | os.PathLike | None = None,
               say: Say = _stderr) -> tuple[Segmentor, dict[str, Any]]:
    """Rebuild a kept or exported model for inference: the pretrained backbone from ``weights`` (else the
    path the card recorded, if still there, else ``$FISHERTUNE_WEIGHTS/<official file>``), refused in
    one line when it differs from the one trained on (size, then sha256); a backbone drawn from the
    seed is drawn again and refused when it is not the one recorded; then the kept state. Returns the
    model in eval mode and its card."""
    model = Path(model)
    card = read_card(model)
    config = card["config"]
    recorded = card["pretrained"].get("path")
    explicit = weights or (recorded if recorded and Path(recorded).is_file() else None)
    path = _pretrained_source(card, explicit, model)
    kept = model / MODEL_FILE
    if file_sha256(kept) != card["kept"]["sha256"]:
        raise UserError(f"{kept}: its sha256 is not the one its card records; the file was changed or damaged: "
                        "export the model again")
    ctx = MethodContext(device=device, seed=config["seed"])
    with compute_dtype(card["inference"]["precision"]):  # an fp64 cell's model is rebuilt in float64, as it trained
        segmentor, _, built = build_segmentor(config, path, device, ctx, where=str(model / CARD_FILE), digest=True)
    if built != card["pretrained"]["state_sha256"]:
        commit = (card.get("git") or {}).get("commit")
        if path is None:
            raise UserError(f"{model}: {config['backbone']} drawn from seed {config['seed']} is not the backbone this "
                            f"model was trained on (the code that builds it changed since commit {commit}); use "
                            "that version of fishertune-bench")
        say(f"note: {config['backbone']} loaded from {path} differs in its values from the backbone the model "
            f"was trained on (the conversion code or a library changed since commit {commit}); predictions may "
            "differ slightly from the saved ones")
    load_kept(segmentor, kept)
    return segmentor.eval(), card


# ------------------------------------------------------------------------------------ export


def find_result(spec: str, results: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A finished cell's result from ``spec``: the path of its result JSON, or its cell id (a glob
    matching one cell) under ``results``."""
    path = Path(spec)
    if path.is_file():
        return path, read_result(path)
    hits = [(p, r) for p, r in iter_results(results) if fnmatch.fnmatch(str(r.get("cell_id")), spec)]
    if not hits:
        raise UserError(f"{spec}: no such result file, and no cell id under {results} matches it; give the path "
                        "of a result JSON or a cell id (`fishertune run MANIFEST --dry-run` lists them), or "
                        "pass --results DIR")
    if len(hits) > 1:
        listed = ", ".join(str(p) for p, _ in hits[:4]) + (f" and {len(hits) - 4} more" if len(hits) > 4 else "")
        raise UserError(f"{spec} matches {len(hits)} results ({listed}); give one result file")
    return hits[0]


def export_model(spec: str, results: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy a finished cell's kept model into ``out`` (a new or empty directory), with a README saying
    what it is, what it needs and how to run it; the kept file is checked against the result first.
    The package is assembled beside ``out`` and renamed into place, so ``out`` is complete or absent."""
    from jinja2 import Environment, PackageLoader

    result_path, record = find_result(spec, results)
    if record.get("status", "done") != "done":
        raise UserError(f"{result_path}: the cell {record.get('status')} (`fishertune status` says why); only a "
                        "finished cell has a model")
    folder = model_dir(result_path)
    entry = record.get("model")
    if not entry or not (folder / MODEL_FILE).is_file():
        why = ("its manifest had execution.keep_model: false" if "model" in record
               else "it ran before models were kept")
        raise UserError(f"{result_path}: no kept model ({why}); rerun the cell: rm {result_path} && fishertune run "
                        f"{record.get('manifest', {}).get('path')} --only '{record.get('cell_id')}'")
    card = read_card(folder)
    if file_sha256(folder / MODEL_FILE) != entry["sha256"]:
        raise UserError(f"{folder / MODEL_FILE}: its sha256 is not the one the result records; the file was "
                        f"changed or damaged: rerun the cell")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory; choose a new directory")
    env = Environment(loader=PackageLoader("fishertune", "templates"), keep_trailing_newline=True)
    readme = env.get_template("model-readme.md.j2").render(card=card, out=out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); choose a writable directory") from None
    try:
        shutil.copyfile(folder / MODEL_FILE, staging / MODEL_FILE)
        shutil.copyfile(folder / CARD_FILE, staging / CARD_FILE)
        (staging / README_FILE).write_text(readme)
        os.chmod(staging, 0o755)
        if out.is_dir():
            out.rmdir()
        os.replace(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write {out} ({e.strerror}); free some space or choose another directory") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
