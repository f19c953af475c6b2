"""Shared fixtures."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fishertune.data import synthesize

SYNTH_IMAGES = 6  # per split (GTAV: twice that); enough for every class to occur in every split


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The miniature, synthesized once per test session (seed 0); tests must not modify it."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, images=SYNTH_IMAGES, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_images() -> int:
    """Images per split in :func:`synth_root`."""
    return SYNTH_IMAGES


@pytest.fixture(scope="session")
def synth_counts(synth_root) -> dict[str, dict[str, int]]:
    """Pairs per data set and split as recorded by the synthesizer in SYNTH.json."""
    return json.loads((synth_root / "SYNTH.json").read_text())["counts"]


MINI_PROTOCOL = Path(__file__).resolve().parents[1] / "benchmarks" / "mini" / "protocol.yaml"


@pytest.fixture
def mini_manifest(tmp_path, synth_root):
    """``write(name, body, data=None) -> Path``: a manifest over the mini protocol with one tiny
    backbone, reading the session's miniature (or ``data``, a YAML flow mapping) ; ``body`` adds fields.
    Its cells run one at a time in the test's own process (``execution.jobs: 1``, unless ``body`` sets
    the execution section itself), so that a test's monkeypatches reach them."""

    def write(name: str, body: str, data: str | None = None, table: str = "table1") -> Path:
        data = data or f"{{root: {synth_root}, synth_images: {SYNTH_IMAGES}, synth_train_images: {2 * SYNTH_IMAGES}}}"
        if "execution:" not in body:
            body += "execution: {jobs: 1}\n"
        elif "execution: {" in body:
            body = body.replace("execution: {", "execution: {jobs: 1, ", 1)
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"version: 1\nname: {name}\ntable: {table}\ninclude: {MINI_PROTOCOL}\n"
                        f"backbones: [dinov2-tiny]\n{body}data: {data}\n")
        return path

    return write


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny forward/backward passes: on a 2-core machine shared
    with other work, torch's default threads made them about 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def _linear_output_dtypes():
    seen: dict[str, set] = {"train": set(), "eval": set()}

    def hook(module, args, out):
        if isinstance(module, torch.nn.Linear) and isinstance(out, torch.Tensor):
            seen["train" if module.training else "eval"].add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture
def linear_dtypes():
    """``with linear_dtypes() as seen:``: the output dtypes of every Linear layer that runs in the block, in
    training and in evaluation (``seen["train"]``, ``seen["eval"]``): what precision a cell really computes in."""
    return _linear_output_dtypes
