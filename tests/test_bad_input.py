"""Issue 10: every malformed input is answered by one line naming the problem, exit 2, and no output.

Each case builds its bad input in a fresh directory and runs the command in-process; the check is the
same for all: exit code 2, exactly one line on stderr (``fishertune: error: ...``) containing what the
case expects, no traceback, and not one file written under the results or output directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fishertune.cli import main

GOOD = """\
version: 1
name: bad
table: table1
include: {protocol}
backbones: [dinov2-tiny]
methods: [freeze]
train: {{iterations: 2}}
data: {{root: {root}, synth_images: {images}}}
"""
PROTOCOL = Path(__file__).resolve().parents[1] / "benchmarks" / "mini" / "protocol.yaml"


class Case:
    """``tmp``: a fresh directory; ``synth``: the session's miniature (read only); ``images``: its size."""

    def __init__(self, tmp: Path, synth: Path, images: int):
        self.tmp, self.synth, self.images = tmp, synth, images
        self.results = tmp / "results"

    def manifest(self, extra: str = "", replace: tuple[str, str] | None = None, text: str | None = None) -> str:
        body = text if text is not None else GOOD.format(protocol=PROTOCOL, root=self.synth, images=self.images)
        if replace:
            assert replace[0] in body, replace
            body = body.replace(*replace)
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
        return self.manifest(extra, replace=(f"data: {{root: {self.synth}, synth_images: {self.images}}}",
                                             f"data: {{kind: real, root: {root}}}"))

    def weights(self, make) -> list[str]:
        """A full-size DINOv2 run whose checkpoint file ``make(path)`` writes (meta-device fit check)."""
        path = self.tmp / "dinov2_vitl14_pretrain.pth"
        make(path)
        m = self.manifest(f"weights: {{dinov2-l: {path}}}\n", replace=("[dinov2-tiny]", "[dinov2-l]"))
        return self.run(m)


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
]


@pytest.mark.parametrize("name,make,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output(name, make, expected, tmp_path, synth_root, synth_images,
                                                     capsys, monkeypatch):
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FISHERTUNE_WEIGHTS", raising=False)
    case = Case(tmp_path, synth_root, synth_images)
    argv = make(case)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fishertune: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    written = {p for p in written if "cache" not in p.relative_to(tmp_path).parts}  # verification memos only
    assert not written, sorted(written)


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30
