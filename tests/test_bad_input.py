"""Issues 10 and 18: every malformed input is answered by one line naming the problem, exit 2, no output.

Each case builds its bad input in a fresh directory and runs the command in-process; the check is the
same for all: exit code 2, exactly one line on stderr (``fishertune: error: ...``) containing what the
case expects, no traceback, and not one file or folder written outside the verification cache (the
memos of ``fishertune.data.verify.preflight`` and the caches a case sets up on purpose).
Groups: manifests (syntax, names, every numeric field's range), command-line options, weights,
checkpoint, cache and result files, data trees (as released, prepared, partial).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fishertune.cli import main
from fishertune.data.prepare import prepare_dataset
from fishertune.runner.manifest import load_manifest

GOOD = """\
version: 1
name: bad
table: table1
include: {protocol}
backbones: [dinov2-tiny]
methods: [freeze]
train: {{iterations: 2}}
data: {{root: {root}, synth_images: {images}, synth_train_images: {train}}}
"""
PROTOCOL = Path(__file__).resolve().parents[1] / "benchmarks" / "mini" / "protocol.yaml"


class Case:
    """``tmp``: a fresh directory; ``synth``: the session's miniature (read only); ``images``: its size."""

    def __init__(self, tmp: Path, synth: Path, images: int):
        self.tmp, self.synth, self.images = tmp, synth, images
        self.results = tmp / "results"

    def manifest(self, extra: str = "", replace: tuple[str, str] | list[tuple[str, str]] | None = None,
                 text: str | None = None) -> str:
        body = text if text is not None else GOOD.format(protocol=PROTOCOL, root=self.synth, images=self.images,
                                                         train=2 * self.images)
        for old, new in [replace] if isinstance(replace, tuple) else replace or []:
            assert old in body, old
            body = body.replace(old, new)
        path = self.tmp / "m.yaml"
        path.write_text(body + extra)
        return str(path)

    def run(self, *args: str) -> list[str]:
        return ["run", *args, "--results", str(self.results), "--no-render"]

    def data_copy(self) -> Path:
        """A writable copy of the miniature, read as real data (its SYNTH.json gives the counts)."""
        root = self.tmp / "data"
        shutil.copytree(self.synth, root)
        return root

    def real(self, root: Path, extra: str = "") -> str:
        return self.manifest(extra, replace=(f"data: {{root: {self.synth}, synth_images: {self.images}, "
                                             f"synth_train_images: {2 * self.images}}}",
                                             f"data: {{kind: real, root: {root}}}"))

    def weights(self, make, suffix: str = ".pth") -> list[str]:
        """A full-size DINOv2 run whose checkpoint file ``make(path)`` writes (meta-device fit check)."""
        path = self.tmp / f"dinov2_vitl14_pretrain{suffix}"
        make(path)
        m = self.manifest(f"weights: {{dinov2-l: {path}}}\n", replace=("[dinov2-tiny]", "[dinov2-l]"))
        return self.run(m)

    def train(self, fields: str) -> list[str]:
        """A run whose manifest sets these ``train`` fields (a YAML flow mapping's inside)."""
        return self.run(self.manifest(replace=("iterations: 2", f"iterations: 2, {fields}")))

    def cell_file(self, manifest: str, folder: str, suffix: str) -> Path:
        """Where the first cell of ``manifest`` keeps its result (``folder`` "") or its checkpoint."""
        cell = load_manifest(manifest).cells()[0]
        path = self.results / "bad" / folder / f"{cell.id}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def fisher(self, selector: str, damage) -> list[str]:
        """``fishertune fisher`` once to fill the cache for a one-cell FisherTune grid, ``damage(cache folder)``,
        then the same command again."""
        m = self.manifest(f"method_configs: {{fishertune: {{selector: {selector}, estimator: direct, images: 2}}}}\n",
                          replace=("[freeze]", "[fishertune]"))
        assert main(["fisher", m]) == 0
        damage(next((self.tmp / "cache" / "fisher").iterdir()))
        return ["fisher", m]


def _city_label(root: Path) -> Path:
    return sorted((root / "cityscapes" / "gtFine" / "val").rglob("*_labelTrainIds.png"))[0]


def _city_image(root: Path) -> Path:
    return sorted((root / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0]


def _truncate(path: Path, keep: int = 200) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _illegal_label(c: Case) -> list[str]:
    root = c.data_copy()
    label = _city_label(root)
    arr = np.array(Image.open(label))
    arr[0, :5] = 77  # no train id 77 (0..18 and 255)
    Image.fromarray(arr).save(label)
    return c.run(c.real(root))


def _wrong_size_label(c: Case) -> list[str]:
    root = c.data_copy()
    label = _city_label(root)
    Image.fromarray(np.array(Image.open(label))[:-4]).save(label)
    return c.run(c.real(root))


def _code_checkpoint(path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"pos_embed": Evil()}, path)


def _foreign_checkpoint(path: Path) -> None:
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 14, 14), "visual.proj": torch.zeros(8, 4)}, path)


def _truncated_checkpoint(path: Path) -> None:
    torch.save({"cls_token": torch.zeros(1, 1, 1024), "pos_embed": torch.zeros(1, 1370, 1024)}, path)
    _truncate(path, 1000)


def _results_is_a_file(c: Case) -> list[str]:
    c.results.write_text("not a directory")
    return c.run(c.manifest())


def _unwritable_results(c: Case) -> list[str]:
    blocker = c.tmp / "blocker"
    blocker.write_text("x")
    c.results = blocker / "results"
    return c.run(c.manifest())


def _prepared(c: Case, name: str, damage) -> list[str]:
    """A real-layout copy whose ``name`` is prepared, then ``damage(root of name)``, read by a run."""
    root = c.data_copy()
    assert prepare_dataset(name, root / name, progress=False).ok
    damage(root / name)
    targets = "targets: [mapillary]\n" if name == "mapillary" else ""
    return c.run(c.real(root, targets))


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def _unlabel(root: Path) -> None:
    """Mapillary: the first validation image loses its label."""
    _first(root, "validation/v1.2/labels/*.png").unlink()


def _mapillary_id(root: Path) -> None:
    """Mapillary: an id outside the 66 of v1.2 in the first validation label."""
    label = _first(root, "validation/v1.2/labels/*.png")
    ids = np.array(Image.open(label))
    ids[:2, :2] = 70
    Image.fromarray(ids).save(label)


def _copy_then(c: Case, damage, extra: str = "") -> list[str]:
    """A run on a real-layout copy of the miniature after ``damage(root)``."""
    root = c.data_copy()
    damage(root)
    return c.run(c.real(root, extra))


def _colour_label(root: Path) -> None:
    label = _city_label(root)
    Image.open(label).convert("RGB").save(label)


def _folder_for_label(root: Path) -> None:
    label = _city_label(root)
    label.unlink()
    label.mkdir()


def _damaged_mask(folder: Path) -> None:
    _truncate(next(folder.glob("mask-*.safetensors")), 40)


def _mask_out_of_range(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = next(folder.glob("mask-*.safetensors"))
    mask = load_file(str(path))
    name = next(n for n, t in mask.items() if t.numel())
    mask[name] = mask[name] + 10**9  # past the parameter's last element
    save_file(mask, str(path))


def _damaged_estimate(folder: Path) -> None:
    for mask in folder.glob("mask-*.safetensors"):
        mask.unlink()  # so that the estimate is read again
    path = folder / "estimate.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])


def _checkpoint(c: Case, state) -> list[str]:
    m = c.manifest()
    torch.save(state, c.cell_file(m, "checkpoints", ".pt"))
    return c.run(m)


def _truncated_cell_checkpoint(c: Case) -> list[str]:
    m = c.manifest()
    path = c.cell_file(m, "checkpoints", ".pt")
    torch.save({"version": 1, "iteration": 3, "model": {"x": torch.zeros(1000)}}, path)
    _truncate(path, 100)
    return c.run(m)


def _result(c: Case, text: str | bytes, command: str = "run") -> list[str]:
    m = c.manifest()
    path = c.cell_file(m, "", ".json")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return [command, m, "--results", str(c.results)] + (["--no-render"] if command == "run" else [])


SYNTH_VAL = 6  # the session miniature's validation images per split (tests/conftest.py SYNTH_IMAGES)

CASES = [
    # manifest syntax and types
    ("not YAML", lambda c: c.run(c.manifest(text="version: 1\nname: [unclosed\n")), "not valid YAML at line"),
    ("not a mapping", lambda c: c.run(c.manifest(text="- a\n- b\n")), "a manifest is a YAML mapping"),
    ("missing manifest", lambda c: c.run(str(c.tmp / "nope.yaml")), "manifest not found"),
    ("typo at top level", lambda c: c.run(c.manifest("backbone: [x]\n")), "did you mean 'backbones'"),
    ("typo in a section", lambda c: c.run(c.manifest("execution: {num_worker: 2}\n")), "did you mean 'num_workers'"),
    ("exponent read as text", lambda c: c.run(c.manifest("seed: 1e3\n")), "expected a number, got the string '1e3'"),
    ("boolean for text", lambda c: c.run(c.manifest(replace=("name: bad", "name: no"))), "got the boolean False"),
    ("wrong type", lambda c: c.run(c.manifest(replace=("iterations: 2", "iterations: many"))), "train.iterations"),
    ("negative iterations", lambda c: c.run(c.manifest(replace=("iterations: 2", "iterations: -5"))),
     "train.iterations: Input should be greater than 0"),
    ("missing required field", lambda c: c.run(c.manifest(replace=("name: bad\n", ""))),
     "name: required field is missing"),
    ("two levels of include", lambda c: (c.tmp.joinpath("inc.yaml").write_text(f"include: {PROTOCOL}\n"),
                                         c.run(c.manifest(replace=(f"include: {PROTOCOL}", "include: inc.yaml"))))[1],
     "only one level of include"),
    # names
    ("unknown backbone", lambda c: c.run(c.manifest(replace=("[dinov2-tiny]", "[dinov2-tny]"))),
     "unknown backbone 'dinov2-tny'; did you mean 'dinov2-tiny'"),
    ("unknown method", lambda c: c.run(c.manifest(replace=("[freeze]", "[lorra]"))),
     "unknown method 'lorra'; did you mean 'lora'"),
    ("unknown method option", lambda c: c.run(c.manifest("method_configs: {lora: {rnak: 4}}\n",
                                                          replace=("[freeze]", "[lora]"))), "did you mean 'rank'"),
    ("unknown target", lambda c: c.run(c.manifest("targets: [citiscapes]\n")), "unknown target 'citiscapes'"),
    ("unknown head", lambda c: c.run(c.manifest("head: {name: mask3former}\n")), "mask3former"),
    ("same cell twice", lambda c: c.run(c.manifest(replace=("[freeze]", "[freeze, freeze]"))),
     "the same cell appears twice"),
    ("--only matches nothing", lambda c: c.run(c.manifest(), "--only", "nothing-*"), "matches no cell"),
    ("impossible budget", lambda c: c.run(c.manifest("method_configs: {fishertune: {budget: 1.5}}\n",
                                                     replace=("[freeze]", "[fishertune]"))), "budget"),
    ("zero budget", lambda c: c.run(c.manifest("method_configs: {fishertune: {budget: 0.0}}\n",
                                               replace=("[freeze]", "[fishertune]"))), "budget"),
    ("retry with a job executor", lambda c: c.run(c.manifest(), "--executor", "submitit-local", "--retry-failed"),
     "--retry-failed runs here only"),
    ("subset of zero", lambda c: c.run(c.manifest(), "--subset", "0"), "subset"),
    # data
    ("no data root", lambda c: c.run(c.real(c.tmp / "absent")), "gtav is expected at"),
    ("empty data set", lambda c: ([c.tmp.joinpath("empty", n).mkdir(parents=True) for n in
                                   ("gtav", "cityscapes", "bdd100k", "mapillary")],
                                  c.run(c.real(c.tmp / "empty")))[1], "gtav at "),
    ("truncated image", lambda c: (lambda root: (_truncate(_city_image(root)), c.run(c.real(root)))[1])(c.data_copy()),
     "cityscapes"),
    ("not an image", lambda c: (lambda root: (_city_image(root).write_bytes(b"GIF89a but not really"),
                                              c.run(c.real(root)))[1])(c.data_copy()), "cityscapes"),
    ("label with illegal values", _illegal_label, "77"),
    ("label of another size", _wrong_size_label, "size"),
    # checkpoints (a full-size backbone, checked on the meta device before anything runs)
    ("missing checkpoint", lambda c: c.run(c.manifest(f"weights: {{dinov2-l: {c.tmp / 'none.pth'}}}\n",
                                                      replace=("[dinov2-tiny]", "[dinov2-l]"))), "does not exist"),
    ("checkpoint of another family", lambda c: c.weights(_foreign_checkpoint), "does not fit"),
    ("truncated checkpoint", lambda c: c.weights(_truncated_checkpoint), "cannot be read"),
    ("checkpoint carrying code", lambda c: c.weights(_code_checkpoint), "carries objects other than tensors"),
    ("checkpoint of the wrong size", lambda c: c.weights(lambda p: torch.save({"cls_token": torch.zeros(3)}, p)),
     "does not fit"),
    ("checkpoint that is not a state dict", lambda c: c.weights(lambda p: torch.save([1, 2], p)),
     "does not hold a dictionary of tensors"),
    # where results go
    ("results path is a file", _results_is_a_file, "not writable"),
    ("results under a file", _unwritable_results, "not writable"),
    ("render into a file", lambda c: (c.tmp.joinpath("f").write_text("x"),
                                      ["render", "table1", "--paper-only", "--out", str(c.tmp / "f" / "t")])[1],
     "cannot write"),
    # ---- issue 18 ----
    # manifests: syntax and names
    ("duplicate key", lambda c: c.run(c.manifest("train: {lr: 0.1}\n")), "duplicate key 'train' (first at line 7)"),
    ("duplicate key in a flow mapping", lambda c: c.run(c.manifest(replace=("iterations: 2", "iterations: 2, "
                                                                            "iterations: 3"))),
     "duplicate key 'iterations'"),
    ("not UTF-8", lambda c: (c.tmp.joinpath("latin.yaml").write_bytes(b"version: 1\nname: caf\xe9\n"),
                             c.run(str(c.tmp / "latin.yaml")))[1], "not UTF-8"),
    ("manifest is a folder", lambda c: c.run(str(c.tmp)), "is a directory"),
    ("name '..'", lambda c: c.run(c.manifest(replace=("name: bad", "name: '..'"))), "name: String should match"),
    ("name with a slash", lambda c: c.run(c.manifest(replace=("name: bad", "name: a/b"))), "name: String should match"),
    ("misspelt table", lambda c: c.run(c.manifest(replace=("table: table1", "table: tabel1"))), "table: Input should be"),
    ("target twice", lambda c: c.run(c.manifest("targets: [cityscapes, cityscapes]\n")), "'cityscapes' is listed twice"),
    ("misspelt test size", lambda c: c.run(c.manifest("eval: {test_sizes: {citiscapes: [128, 64]}}\n")),
     "unknown target 'citiscapes'; did you mean 'cityscapes'"),
    ("misspelt method config", lambda c: c.run(c.manifest("method_configs: {lorra: {rank: 4}}\n")),
     "method_configs: unknown method 'lorra'; did you mean 'lora'"),
    ("bad config of a method not run", lambda c: c.run(c.manifest("method_configs: {lora: {rank: 0}}\n")),
     "method 'lora' config field 'rank'"),
    ("unknown data set in roots", lambda c: c.run(c.manifest(replace=("synth_images:", "roots: {citiscapes: /x}, "
                                                                                     "synth_images:"))),
     "unknown data set 'citiscapes'"),
    ("unknown count policy", lambda c: c.run(c.manifest(replace=("synth_images:", "counts: some, synth_images:"))),
     "data.counts"),
    # manifests: every number in range, before any data is read
    ("infinite learning rate", lambda c: c.train("lr: .inf"), "train.lr: Input should be a finite number"),
    ("NaN weight decay", lambda c: c.train("weight_decay: .nan"), "train.weight_decay"),
    ("zero batch", lambda c: c.train("batch_size: 0"), "train.batch_size: Input should be greater than 0"),
    ("negative warm-up", lambda c: c.train("warmup_iterations: -1"), "train.warmup_iterations"),
    ("flip probability above 1", lambda c: c.train("flip_prob: 1.5"), "train.flip_prob"),
    ("class ratio of zero", lambda c: c.train("cat_max_ratio: 0.0"), "train.cat_max_ratio"),
    ("inverted short-edge range", lambda c: c.train("short_edge_range: [128, 32]"), "short_edge_range: [128, 32] is "
                                                                                    "inverted"),
    ("negative short edge", lambda c: c.train("short_edge_range: [-32, 128]"), "train.short_edge_range.0"),
    ("long edge below the crop", lambda c: c.train("max_long_edge: 48"), "max_long_edge: 48 is below crop_size 64"),
    ("crop not a multiple of the patch", lambda c: c.train("crop_size: 60"), "train.crop_size: 60 is not a multiple "
                                                                             "of dinov2-tiny's patch size 8"),
    ("window not a multiple of the patch", lambda c: c.run(c.manifest("eval: {crop_size: 60, stride: 40}\n")),
     "eval.crop_size: 60 is not a multiple"),
    ("window of one patch", lambda c: c.run(c.manifest("eval: {crop_size: 8, stride: 8}\n")),
     "eval.crop_size: 8 is not a multiple of dinov2-tiny's patch size 8 of at least two patches"),
    ("crop too small to build", lambda c: c.run(c.manifest(replace=[("[dinov2-tiny]", "[sam-tiny]"),
                                                                    ("iterations: 2", "iterations: 2, crop_size: 4")])),
     "sam-tiny cannot be built for 4x4 crops"),
    ("stride larger than the window", lambda c: c.run(c.manifest("eval: {stride: 65}\n")),
     "stride: 65 is larger than crop_size 64"),
    ("zero test size", lambda c: c.run(c.manifest("eval: {test_sizes: {cityscapes: [0, 64]}}\n")),
     "eval.test_sizes.cityscapes.0"),
    ("negative test size", lambda c: c.run(c.manifest("eval: {test_sizes: {bdd100k: [160, -90]}}\n")),
     "eval.test_sizes.bdd100k.1"),
    ("negative seed", lambda c: c.run(c.manifest("seed: -1\n")), "seed: Input should be greater than or equal to 0"),
    ("seed past 2**63", lambda c: c.run(c.manifest(f"seed: {2**64}\n")), "seed: Input should be less than or equal"),
    ("negative generator seed", lambda c: c.run(c.manifest(replace=("synth_images:", "synth_seed: -3, synth_images:"))),
     "data.synth_seed"),
    ("negative selection seed", lambda c: c.run(c.manifest("method_configs: {fishertune: {selection_seed: -2}}\n",
                                                           replace=("[freeze]", "[fishertune]"))), "selection_seed"),
    ("subset of zero in the manifest", lambda c: c.run(c.manifest(replace=("synth_images:", "subset: 0, "
                                                                                           "synth_images:"))),
     "data.subset"),
    ("negative loader workers", lambda c: c.run(c.manifest("execution: {num_workers: -1}\n")),
     "execution.num_workers"),
    ("negative head option", lambda c: c.run(c.manifest("head: {config: {channels: -32}}\n")),
     "head 'mask2former-tiny' option 'channels': Input should be greater than or equal to 0"),
    ("head options that do not fit", lambda c: c.run(c.manifest("head: {config: {channels: 36}}\n")),
     "channels 36 must be even and divisible by num_heads 4"),
    ("infinite head weight", lambda c: c.run(c.manifest("head: {config: {dice_weight: .inf}}\n")),
     "option 'dice_weight': Input should be a finite number"),
    ("infinite method option", lambda c: c.run(c.manifest("method_configs: {lora: {alpha: .inf}}\n",
                                                          replace=("[freeze]", "[lora]"))), "finite number"),
    # command-line options
    ("subset as large as the data set", lambda c: c.run(c.manifest(), "--subset", str(c.images)),
     f"is not smaller than the {SYNTH_VAL} images of cityscapes val"),
    ("negative subset", lambda c: c.run(c.manifest(), "--subset", "-3"), "data.subset"),
    ("Slurm option with the local executor", lambda c: c.run(c.manifest(), "--slurm-time", "5"),
     "--slurm-time is for --executor slurm"),
    ("synth with no images", lambda c: ["data", "synth", "--out", str(c.tmp / "s"), "--images", "0"],
     "--images must be at least 1"),
    ("synth with a negative seed", lambda c: ["data", "synth", "--out", str(c.tmp / "s"), "--seed", "-1"],
     "--seed must be in 0..2**63-1"),
    ("synth into a file", lambda c: (c.tmp.joinpath("f").write_text("x"),
                                     ["data", "synth", "--out", str(c.tmp / "f"), "--images", "1"])[1],
     "cannot write the miniature"),
    ("prepare with no workers", lambda c: ["data", "prepare", "gtav", "--root", str(c.synth / "gtav"),
                                           "--workers", "0"], "--workers must be at least 1"),
    ("verify an unknown data set", lambda c: ["data", "verify", "gta5", "--root", str(c.synth / "gtav")],
     "unknown data set 'gta5'"),
    ("verify an unknown split", lambda c: ["data", "verify", "cityscapes", "--root", str(c.synth / "cityscapes"),
                                           "--split", "test"], "unknown split 'test'"),
    ("render an unknown table", lambda c: ["render", "tabel1", "--out", str(c.tmp / "t")], "unknown table 'tabel1'"),
    ("paper-only for another table", lambda c: ["render", "table2", "--paper-only", "--out", str(c.tmp / "t")],
     "--paper-only renders table1 only"),
    ("render from no results", lambda c: ["render", "table1", "--results", str(c.tmp / "none"), "--out",
                                          str(c.tmp / "t")], "does not exist"),
    ("plot no images", lambda c: ["plot", "--results", str(c.tmp), "--images", "0", "--out", str(c.tmp / "p")],
     "--images must be at least 1"),
    # weights, checkpoint, cache and result files
    ("weights path is a folder", lambda c: c.run(c.manifest(f"weights: {{dinov2-l: {c.tmp}}}\n",
                                                            replace=("[dinov2-tiny]", "[dinov2-l]"))),
     "is a directory; give the path of the file"),
    ("empty weights file", lambda c: c.weights(lambda p: p.write_bytes(b"")), "cannot be read"),
    ("safetensors with a broken header", lambda c: c.weights(lambda p: p.write_bytes(b"\x20\0\0\0\0\0\0\0{bad"),
                                                             ".safetensors"), "cannot be read"),
    ("safetensors of another model", lambda c: c.weights(lambda p: __import__("safetensors.torch").torch.save_file(
        {"visual.proj": torch.zeros(2, 2)}, str(p)), ".safetensors"), "does not fit"),
    ("pickle protocol 3 (torch warns)", lambda c: c.weights(lambda p: torch.save({"visual.proj": torch.zeros(2, 2)}, p,
                                                                                 pickle_protocol=3)), "does not fit"),
    ("checkpoint without its keys", lambda c: _checkpoint(c, {"version": 1, "iteration": 3}),
     "a damaged checkpoint (lacks or mistypes model, optimizer"),
    ("checkpoint of another model", lambda c: _checkpoint(c, {
        "version": 1, "iteration": 3, "model": {}, "optimizer": {}, "scheduler": {}, "losses": [],
        "last_finite": None, "window": torch.zeros(1), "seconds": 1.0, "rng": []}), "does not fit this cell's model"),
    ("truncated cell checkpoint", _truncated_cell_checkpoint, "not a loadable checkpoint"),
    ("damaged Fisher mask", lambda c: c.fisher("random", _damaged_mask), "a damaged mask"),
    ("Fisher mask out of range", lambda c: c.fisher("random", _mask_out_of_range), "indices are not sorted, unique "
                                                                                   "int64 in [0,"),
    ("damaged Fisher estimate", lambda c: c.fisher("fim", _damaged_estimate), "a damaged Fisher estimate"),
    ("result that is {}", lambda c: _result(c, "{}"), "not a valid result file (status None"),
    ("result that is []", lambda c: _result(c, "[]", "status"), "not a valid result file (a JSON list"),
    ("result that is {}, to reproduce", lambda c: _result(c, "{}", "reproduce"), "not a valid result file"),
    ("result without numbers", lambda c: _result(c, '{"status": "done", "cell_id": "x"}', "status"),
     "not a valid result file (no 'manifest')"),
    ("result of another cell", lambda c: _result(c, '{"status": "failed", "cell_id": "other", "manifest": {}, '
                                                    '"failure": {}}'), "holds the result of cell 'other'"),
    ("result not UTF-8", lambda c: _result(c, b"\xff\xfe{}", "status"), "not UTF-8"),
    # data trees
    ("other counts without saying so", lambda c: _copy_then(c, lambda r: (r / "SYNTH.json").unlink()),
     "counts that differ from the expected"),
    ("damaged SYNTH.json", lambda c: _copy_then(c, lambda r: (r / "SYNTH.json").write_text("{")), "is damaged"),
    ("data root is a file", lambda c: (c.tmp.joinpath("file").write_text("x"), c.run(c.real(c.tmp / "file")))[1],
     "not a directory"),
    ("colour label", lambda c: _copy_then(c, _colour_label), "cityscapes"),
    ("empty label", lambda c: _copy_then(c, lambda r: _city_label(r).write_bytes(b"")), "cityscapes"),
    ("folder where a label should be", lambda c: _copy_then(c, _folder_for_label), "images without label"),
    ("Mapillary config missing", lambda c: _copy_then(c, lambda r: (r / "mapillary" / "config_v1.2.json").unlink(),
                                                      "targets: [mapillary]\n"), "config"),
    ("Mapillary config not JSON", lambda c: _copy_then(c, lambda r: (r / "mapillary" / "config_v1.2.json")
                                                       .write_text("{"), "targets: [mapillary]\n"), "not valid JSON"),
    ("ACDC condition missing", lambda c: _copy_then(c, lambda r: shutil.rmtree(r / "acdc" / "gt" / "snow"),
                                                    "targets: [acdc]\n"), "acdc"),
    ("GTAV label broken after prepare", lambda c: _prepared(c, "gtav", lambda r: _truncate(
        _first(r, "labels/0000[0-9].png"))), "gtav"),
    ("Mapillary label broken after prepare", lambda c: _prepared(c, "mapillary", _mapillary_id), "values 70"),
    ("Mapillary label lost after prepare", lambda c: _prepared(c, "mapillary", _unlabel), "images without label"),
    ("Mapillary image without label before prepare", lambda c: (lambda root: (
        _unlabel(root / "mapillary"), prepare_dataset("mapillary", root / "mapillary", progress=False),
        c.run(c.real(root, "targets: [mapillary]\n")))[2])(c.data_copy()), "images without label"),
]


@pytest.mark.parametrize("name,make,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output(name, make, expected, tmp_path, synth_root, synth_images,
                                                     capsys, monkeypatch):
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FISHERTUNE_WEIGHTS", raising=False)
    case = Case(tmp_path, synth_root, synth_images)
    argv = make(case)
    capsys.readouterr()  # what setting the case up printed
    before = set(tmp_path.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fishertune: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    written = set(tmp_path.rglob("*")) - before  # files and folders
    written = {p for p in written if "cache" not in p.relative_to(tmp_path).parts}  # verification memos only
    assert not written, sorted(written)


def test_there_are_at_least_seventy_cases():
    assert len(CASES) >= 70 and len({c[0] for c in CASES}) == len(CASES)
