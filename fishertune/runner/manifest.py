"""YAML manifests: validated schema, defaults plus deltas, one level of ``include``, grid expansion.

A manifest is merged over ``fishertune/defaults.yaml`` (the paper's protocol): first the file named
by its ``include`` (if any; included files may not include again), then the manifest itself; nested
mappings merge key by key, everything else replaces (a ``head`` naming another head than the one below it
replaces that head's mapping whole: its ``config`` holds the other head's options). The result is validated strictly: unknown keys,
wrong types and the YAML 1.1 traps (``1e-4`` and ``yes``/``no``/``on``/``off`` read as the wrong type)
are errors naming the file and the field. ``expand`` turns the grid (backbones x methods) into cells
with stable ids.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fishertune.data.synth import VERSION as SYNTH_VERSION
from fishertune.errors import UserError

Pair = Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=2, max_length=2)]
#: a seed: what numpy, torch and Python's random all accept
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
DATASET_NAMES = ("gtav", "cityscapes", "bdd100k", "mapillary", "acdc")
TARGET_NAMES = tuple(n for n in DATASET_NAMES if n != "gtav")
#: the tables a manifest can fill (``fishertune.report.tables.RENDERERS`` renders each)
TABLES = ("table1", "table2", "ablation", "estimation")


class Strict(BaseModel):
    """Unknown keys, wrong types and non-finite numbers (``.inf``, ``.nan``) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(Strict):
    kind: Literal["real", "miniature"] = Field(description="real data on disk, or the generated miniature")
    root: str | None = Field(None, description="directory holding one folder per data set (default $FISHERTUNE_DATA)")
    roots: dict[str, str] = Field(default_factory=dict, description="per-data-set directories, overriding root")
    synth_seed: Seed = Field(0, description="miniature: seed of the scene generator")
    synth_images: int = Field(12, ge=2, description="miniature: images per evaluation split (per ACDC condition)")
    synth_train_images: int | None = Field(None, ge=2, description="miniature: images of each training source "
                                           "(GTAV, Cityscapes train); null: twice synth_images")
    synth_looks: Literal["class", "shuffled"] = Field(
        "class", description="miniature: class (each class has its own colour family and texture, so a patch's "
        "look tells its class) or shuffled (each image gives its classes one another's looks, so only shape, "
        "position and context tell them apart; the labels are the same: a diagnostic of what pretraining is "
        "worth, fishertune/data/synthetic/street.py)")
    subset: int | None = Field(None, gt=0, description="use a deterministic, class-balanced subset of this many "
                               "images of the source and of each target (per ACDC condition); null: all. "
                               "Results and tables say so")
    counts: Literal["official", "any"] = Field(
        "official", description="real data: official (each data set's pairs must number as in its official "
        "release) or any (any number, e.g. part of a data set or a test tree in the official layout; results go "
        "to <name>-anycount/ and tables name the counts used)")

    @field_validator("roots")
    @classmethod
    def _known(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name not in DATASET_NAMES:
                raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
        return v


class HeadConfig(Strict):
    name: str = Field(description="decode head: mask2former, mask2former-tiny, light or linear (fishertune/heads/)")
    config: dict[str, Any] = Field(default_factory=dict, description="the head's own options")


class TrainConfig(Strict):
    iterations: int = Field(gt=0, description="training iterations (Rein: 40000)")
    batch_size: int = Field(gt=0, description="images per iteration (Rein: 4)")
    crop_size: int = Field(gt=0, description="square training crop (Rein: 512)")
    lr: float = Field(gt=0, description="AdamW learning rate (Rein: 1e-4)")
    backbone_lr_mult: float = Field(1.0, gt=0, le=1, description="learning-rate multiplier of the backbone's own "
                                    "weights (those a method did not add: full fine-tuning, sparse elements); "
                                    "Rein: 1, the head and method modules always train at lr")
    weight_decay: float = Field(ge=0, description="AdamW weight decay, none on norms/embeddings/tokens/scales")
    poly_power: float = Field(gt=0, description="poly schedule power (0.9)")
    warmup_iterations: int = Field(ge=0, description="linear warm-up iterations (Rein: 0)")
    short_edge_range: Pair = Field(description="random short edge before cropping, [min, max]")
    max_long_edge: int = Field(gt=0, description="cap of the long edge when rescaling")
    cat_max_ratio: float = Field(gt=0, le=1, description="max share of one class in a crop (0.75)")
    flip_prob: float = Field(ge=0, le=1, description="horizontal flip probability")
    photometric: bool = Field(description="mmseg photometric distortion on/off")
    precision: Literal["fp32", "bf16", "fp64"] = Field(
        "fp32", description="fp32 (Rein); bf16 autocast of forward and loss, in training and evaluation (weights and "
        "optimizer fp32); or fp64: everything in float64, so that a tiny model's numbers no longer depend on the "
        "thread count or the torch version (about 1.7x the CPU time; fishertune/precision.py)")

    @model_validator(mode="after")
    def _sizes(self) -> "TrainConfig":
        low, high = self.short_edge_range
        if low > high:
            raise ValueError(f"short_edge_range: [{low}, {high}] is inverted; write it as [min, max]")
        if self.max_long_edge < self.crop_size:
            raise ValueError(f"max_long_edge: {self.max_long_edge} is below crop_size {self.crop_size}; an image "
                             f"capped so cannot fill a crop: raise max_long_edge or lower crop_size")
        return self


class EvalConfig(Strict):
    crop_size: int = Field(gt=0, description="sliding-window size (512)")
    stride: int = Field(gt=0, description="sliding-window stride (341)")
    test_sizes: dict[str, Pair] = Field(description="per target: [long, short] bound of the ratio-keeping resize")

    @field_validator("test_sizes")
    @classmethod
    def _known_targets(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for name in v:
            if name not in TARGET_NAMES:
                close = difflib.get_close_matches(name, TARGET_NAMES, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unknown target {name!r}; {hint}targets are {', '.join(TARGET_NAMES)}")
        return v

    @model_validator(mode="after")
    def _covered(self) -> "EvalConfig":
        if self.stride > self.crop_size:
            raise ValueError(f"stride: {self.stride} is larger than crop_size {self.crop_size}, so columns and rows "
                             f"between windows would never be predicted; use a stride of at most {self.crop_size}")
        return self


class SlurmConfig(Strict):
    """Resources of each cell's job under ``--executor slurm`` (submitit; one job per cell, one job array)."""

    partition: str | None = Field(None, description="Slurm partition (null: the cluster's default)")
    account: str | None = Field(None, description="Slurm account to charge")
    qos: str | None = Field(None, description="Slurm quality of service")
    constraint: str | None = Field(None, description="Slurm node feature constraint, e.g. a100")
    gpus_per_node: int = Field(1, ge=0, description="GPUs per job (one cell uses one GPU; 0: none requested)")
    cpus_per_task: int = Field(8, gt=0, description="CPU cores per job (data loading workers, evaluation)")
    mem_gb: float | None = Field(None, gt=0, description="memory per job in GB (null: the partition's default)")
    timeout_min: int = Field(24 * 60, gt=0, description="wall-time limit per job in minutes")
    array_parallelism: int | None = Field(None, gt=0, description="at most this many jobs of the array run at "
                                          "once (null: submitit's 256)")
    setup: list[str] = Field(default_factory=list, description="shell lines run in each job before Python, e.g. "
                             "'module load cuda'")
    additional_parameters: dict[str, str | int | bool] = Field(
        default_factory=dict, description="any other sbatch option by its long name, e.g. {requeue: true}")


class ExecutionConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(4, ge=0)
    eval_batch: int = Field(8, gt=0)
    log_every: int = Field(50, gt=0)
    compile: bool = Field(False, description="put the training loss module through torch.compile")
    checkpoint_every: int = Field(1000, ge=0, description="save the training state every N iterations (0: never); "
                                  "rerunning after a kill continues from the last one")
    threads: int | None = Field(None, gt=0, description="intra-op CPU threads (null: torch's default); fixed by "
                                "the mini protocol because the count changes CPU results in the last bits")
    jobs: int = Field(1, gt=0, description="cells run at once by the local executor, each in its own process with "
                      "`threads` threads (on a CPU: cores / threads; a cell's numbers do not depend on it)")
    keep_model: bool = Field(True, description="keep each finished cell's trained model beside its result "
                             "(<cell id>.model/: what trained plus the head, as safetensors, and a card) for "
                             "`fishertune export` and `fishertune predict`; false: keep only the result")
    slurm: SlurmConfig = Field(SlurmConfig(), description="resources of each cell's job under --executor slurm")


class MethodEntry(Strict):
    name: str = Field(description="registered method name")
    label: str | None = Field(None, description="row label, when one method appears with several configs")
    config: dict[str, Any] = Field(default_factory=dict, description="this row's config delta")

    @property
    def row(self) -> str:
        return self.label or self.name


class Manifest(Strict):
    version: int = Field(ge=1, description="manifest version; tables refuse to mix versions")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="results go to <results>/<name>/, tables to results/tables/<name>/: letters, "
                                  "digits, '_', '.', '-', starting with a letter or digit")
    table: Literal[TABLES] = Field(description="the table this grid fills: table1, table2, ablation, estimation")
    description: str = ""
    data: DataConfig
    weights: dict[str, str] = Field(default_factory=dict)
    pretrained: bool = True
    backbones: list[str] = Field(min_length=1)
    methods: list[Union[str, MethodEntry]] = Field(min_length=1)
    method_configs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    source: str
    targets: list[str] = Field(min_length=1)
    aggregate: Literal["mean_over_targets"] = "mean_over_targets"
    seed: Seed = Field(description="the seed of a one-seed manifest (Rein: 42); with `seeds`, their first")
    seeds: list[Seed] | None = Field(None, min_length=1, description="several seeds: each is a cell of its own, "
                                     "tables show mean +- std over them; the first's cells keep a one-seed run's ids")
    head: HeadConfig
    train: TrainConfig
    eval: EvalConfig
    execution: ExecutionConfig = ExecutionConfig()

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v not in DATASET_NAMES:
            raise ValueError(f"unknown data set {v!r}; known: {', '.join(DATASET_NAMES)}")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in TARGET_NAMES:
                raise ValueError(f"unknown target {name!r}; targets are {', '.join(TARGET_NAMES)}")
        if len(set(v)) < len(v):
            twice = next(n for n in v if v.count(n) > 1)
            raise ValueError(f"{twice!r} is listed twice; name each target once")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"a seed appears twice in {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _first_seed(cls, data: Any) -> Any:
        """With ``seeds``, ``seed`` is their first (what data subsets and one-seed tools use)."""
        if isinstance(data, dict) and isinstance(data.get("seeds"), list) and data["seeds"]:
            data = {**data, "seed": data["seeds"][0]}
        return data

    @property
    def seed_list(self) -> list[int]:
        """The seeds the grid runs: ``seeds``, or ``[seed]``."""
        return list(self.seeds) if self.seeds else [self.seed]

    def method_entries(self) -> list[MethodEntry]:
        return [MethodEntry(name=m) if isinstance(m, str) else m for m in self.methods]


# ---------------------------------------------------------------------------------------------------
# reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping (YAML would keep the last
    silently, changing the manifest and its cell ids without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}  # key -> the line it was first seen at
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key; the base class says so
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first[key] + 1}); YAML would keep only "
                        "the last one: merge the two", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: manifest not found; check the path (manifests live under benchmarks/)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a manifest; give the path of a YAML file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded); save the manifest as "
                        "UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read manifest ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a manifest is a YAML mapping of fields (version, name, backbones, ...), got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in delta.items():
        if key == "head" and isinstance(value, dict) and isinstance(out.get(key), dict) \
                and value.get("name", out[key].get("name")) != out[key].get("name"):
            # a head's options belong to its name: naming another head starts its config afresh
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def defaults() -> dict[str, Any]:
    return yaml.safe_load(resources.files("fishertune").joinpath("defaults.yaml").read_text())


_FLOATISH = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_BOOLISH = {"yes", "no", "on", "off", "y", "n", "true", "false"}


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that owns ``loc[-1]``, for did-you-mean."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def _explain(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("str", "MethodEntry", "list["))))
    field = ".".join(str(p) for p in loc) or "(top level)"
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _field_names(Manifest, loc), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; remove it or check its indentation"
        return f"{field}: unknown field{hint}"
    if kind == "missing":
        return f"{field}: required field is missing; add it (see fishertune/defaults.yaml for the protocol's values)"
    if isinstance(value, str) and _FLOATISH.match(value) and kind in ("float_type", "int_type", "float_parsing", "int_parsing"):
        return (f"{field}: expected a number, got the string {value!r}: YAML 1.1 reads exponents without a dot "
                f"as text; write it as {float(value)!r} or with a dot, e.g. 1.0e-4")
    if isinstance(value, bool) and kind == "string_type":
        return (f"{field}: expected text, got the boolean {value}: YAML 1.1 reads yes/no/on/off as booleans; "
                f"put the value in quotes")
    if isinstance(value, str) and value.lower() in _BOOLISH and kind == "bool_type":
        return f"{field}: expected true or false, got the string {value!r}"
    msg = str(err["ctx"]["error"]) if kind == "value_error" and "error" in err.get("ctx", {}) else err["msg"]
    if kind == "value_error" and not loc:  # a check across fields: its message names them
        return msg
    return f"{field}: {msg} (got {value!r})" if not isinstance(value, (dict, list)) else f"{field}: {msg}"


#: the miniature's protocol, which ``tiny`` lays over a manifest: the clone's copy, else the working directory's
MINI_PROTOCOLS = (Path(__file__).resolve().parents[2] / "benchmarks" / "mini" / "protocol.yaml",
                  Path("benchmarks") / "mini" / "protocol.yaml")


def tiny_variant(backbone: str, where: str = "") -> str:
    """The tiny variant of ``backbone``'s family (``sam-h`` -> ``sam-tiny``)."""
    from fishertune.backbones import BACKBONES

    family = BACKBONES.get(backbone, where).family
    name = f"{family}-tiny"
    if name not in BACKBONES:
        raise UserError(f"{where}: {backbone}: its family {family!r} has no tiny variant {name!r}; --tiny needs "
                        f"one (register it beside the family's other variants)")
    return name


def _tiny(path: Path, merged: dict[str, Any]) -> dict[str, Any]:
    """``merged`` with the miniature protocol laid over it (all but its data section), every backbone
    swapped for its family's tiny variant (its shipped tiny foundation model when ``pretrained``) and no
    checkpoint paths."""
    protocol = next((p for p in MINI_PROTOCOLS if p.is_file()), None)
    if protocol is None:
        raise UserError(f"--tiny needs the miniature protocol at {MINI_PROTOCOLS[0]}; run from a clone of "
                        "fishertune-bench")
    mini = {k: v for k, v in _read_yaml(protocol).items() if k != "data"}
    out = _merge(merged, mini)
    backbones = merged.get("backbones")
    if isinstance(backbones, list):
        out["backbones"] = list(dict.fromkeys(tiny_variant(str(b), f"{path}: backbones") for b in backbones))
    out["weights"] = {}
    return out


def load_manifest(path: str | Path, overrides: dict[str, Any] | None = None, tiny: bool = False) -> "LoadedManifest":
    """Read, merge and validate a manifest; any problem is a one-line :class:`UserError`.

    ``overrides`` (from the command line, e.g. ``{"data": {"subset": 50}}``) are merged last. ``tiny``
    runs the manifest's grid on the tiny backbones and the miniature protocol, reading the manifest's
    data (a check of the whole pipeline without weights or a GPU, e.g. on a miniature in
    ``$FISHERTUNE_DATA``); its results go to ``<name>-tiny`` and its tables say TINY."""
    path = Path(path)
    raw = _read_yaml(path)
    if "seed" in raw and "seeds" in raw:
        raise UserError(f"{path}: seed and seeds: give one of them (seeds: [{raw['seed']}, ...] runs several)")
    merged = defaults()
    include = raw.pop("include", None)
    if include is not None:
        if not isinstance(include, str):
            raise UserError(f"{path}: include: expected a file path relative to the manifest, got {include!r}")
        inc_path = (path.parent / include).resolve()
        inc = _read_yaml(inc_path)
        if "include" in inc:
            raise UserError(f"{inc_path}: include: only one level of include is allowed; merge that file into {path.name}")
        merged = _merge(merged, inc)
    merged = _merge(merged, raw)
    if overrides:
        seeds = overrides.get("seeds")
        overrides = {k: v for k, v in overrides.items() if k != "seeds"}
        merged = _merge(merged, overrides)
        if seeds is not None:  # --seeds N: the manifest's seeds, continued (or cut) to N
            merged["seeds"] = extend_seeds(merged.get("seeds") or [merged.get("seed", 0)], seeds)
    if tiny:
        merged = _tiny(path, merged)
    try:
        manifest = Manifest(**merged)
    except ValidationError as e:
        raise UserError(f"{path}: {_explain(e.errors()[0])}") from None
    return LoadedManifest(path=path, manifest=manifest, tiny=tiny)


#: training fields added after cells were first run: left out of a cell's config at these values, so that
#: existing cells keep their ids
_LATER_TRAIN_FIELDS = {"precision": "fp32", "backbone_lr_mult": 1.0}


def _at_default(train: TrainConfig) -> set[str]:
    return {k for k, v in _LATER_TRAIN_FIELDS.items() if getattr(train, k) == v}


def extend_seeds(seeds: list, n: int) -> list:
    """The first ``n`` of ``seeds`` continued by consecutive integers after their largest
    (``[42], 3 -> [42, 43, 44]``; ``[42, 43, 44], 1 -> [42]``)."""
    out = list(seeds)
    while len(out) < n:
        out.append(max(int(s) for s in out) + 1)
    return out[:n]


# ---------------------------------------------------------------------------------------------------
# cells


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a backbone x method on the manifest's protocol."""

    id: str
    backbone: str
    method: str
    row: str
    method_config: dict[str, Any]
    config: dict[str, Any]  # everything that determines the numbers; hashed into the id

    @property
    def seed(self) -> int:
        return self.config["seed"]


def results_name(name: str, tiny: bool = False, subset: int | None = None, any_count: bool = False) -> str:
    """The folder of a manifest's results, tables and plots: its name, plus ``-tiny`` under the tiny override,
    ``-subset<N>`` for a subset run and ``-anycount`` for data with other than the official counts, so that
    such runs never sit beside (or get tabled with) full runs."""
    return (name + ("-tiny" if tiny else "") + (f"-subset{subset}" if subset else "")
            + ("-anycount" if any_count else ""))


def _patch_size(backbone: str, crop: int, where: str) -> int:
    """The patch size of ``backbone`` built for ``crop`` (on the meta device: no weights, no memory)."""
    import torch

    from fishertune.backbones import BACKBONES

    try:
        with torch.device("meta"):
            return int(BACKBONES.get(backbone).fn(img_size=crop).patch_size)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserError(f"{where}: train.crop_size: {backbone} cannot be built for {crop}x{crop} crops "
                        f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); use a larger "
                        "crop") from None


@dataclass(frozen=True)
class LoadedManifest:
    path: Path
    manifest: Manifest
    tiny: bool = False  # the tiny override (load_manifest's ``tiny``)

    @property
    def results_name(self) -> str:
        """The folder of this manifest's results (:func:`results_name`)."""
        m = self.manifest
        return results_name(m.name, self.tiny, m.data.subset, m.data.counts == "any")

    def cells(self) -> list[Cell]:
        """Expand backbones x methods x seeds to cells (in that order), validating every name and method config."""
        from fishertune.backbones import BACKBONES
        from fishertune.heads import check_head
        from fishertune.tuning import build_method

        m = self.manifest
        check_head(m.head.name, m.head.config, f"{self.path}: head")
        for name, delta in m.method_configs.items():  # every entry, also of methods this grid does not run
            build_method(name, delta, f"{self.path}: method_configs")
        cells = []
        seen = set()
        for backbone in m.backbones:
            BACKBONES.get(backbone, f"{self.path}: backbones")
            patch = _patch_size(backbone, m.train.crop_size, str(self.path))
            for field, crop in (("train.crop_size", m.train.crop_size), ("eval.crop_size", m.eval.crop_size)):
                if crop % patch or crop < 2 * patch:  # the features' coarsest level is half the patch grid
                    raise UserError(f"{self.path}: {field}: {crop} is not a multiple of {backbone}'s patch size "
                                    f"{patch} of at least two patches; use e.g. {max(2 * patch, crop // patch * patch)}")
            for entry in m.method_entries():
                where = f"{self.path}: methods: {entry.row}"
                delta = {**m.method_configs.get(entry.name, {}), **entry.config}
                method = build_method(entry.name, delta, where)
                method_config = method.cfg.model_dump(mode="json")
                for seed in m.seed_list:  # each seed its own cell; the seed is in the config, hence the id
                    config = {
                        "backbone": backbone,
                        "method": entry.name,
                        "method_config": method_config,
                        "pretrained": m.pretrained,
                        "head": m.head.model_dump(mode="json"),
                        "source": m.source,
                        "targets": list(m.targets),
                        "aggregate": m.aggregate,
                        "seed": seed,
                        # a field added later is left out at its default, so that existing cells keep their ids
                        "train": m.train.model_dump(mode="json", exclude=_at_default(m.train)),
                        "eval": {**m.eval.model_dump(mode="json"),
                                 "test_sizes": {t: m.eval.test_sizes[t] for t in m.targets}},
                        "data": {"kind": m.data.kind}
                        | ({"synth_seed": m.data.synth_seed, "synth_images": m.data.synth_images,
                            "synth_train_images": m.data.synth_train_images or 2 * m.data.synth_images,
                            "synth_version": SYNTH_VERSION}
                           | ({"synth_looks": m.data.synth_looks} if m.data.synth_looks != "class" else {})
                           if m.data.kind == "miniature" else {})
                        | ({"subset": m.data.subset} if m.data.subset else {}),
                    }
                    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
                    cell_id = f"{backbone}--{entry.row}--{m.source}--{digest}"
                    if cell_id in seen:
                        raise UserError(f"{where}: the same cell appears twice; give one of them a different label or "
                                        "config")
                    seen.add(cell_id)
                    cells.append(Cell(cell_id, backbone, entry.name, entry.row, method_config, config))
        return cells
