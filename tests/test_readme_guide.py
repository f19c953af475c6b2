"""The README's "Adding a baseline" walk-through: its code block registers a working method."""

import re
import types
from pathlib import Path

import torch

from fishertune.backbones import build_backbone
from fishertune.heads import build_head
from fishertune.segmentor import Segmentor
from fishertune.tuning import METHODS, MethodContext, build_method

README = Path(__file__).resolve().parents[1] / "README.md"


def _guide_code() -> str:
    text = README.read_text()
    section = text[text.index("## Adding a baseline"):]
    section = section[:section.index("\n## ", 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the guide has exactly one python block: the method's module"
    return blocks[0]


def test_the_guides_method_registers_and_trains_only_biases():
    module = types.ModuleType("baselines_bitfit_from_readme")
    exec(compile(_guide_code(), str(README), "exec"), module.__dict__)  # noqa: S102 - our own README
    try:
        assert "bitfit" in METHODS
        seg = Segmentor(build_backbone("clip-tiny", pretrained=False, seed=0), build_head("light", 128, 19, channels=32))
        method = build_method("bitfit")
        method.apply(seg, MethodContext(device=torch.device("cpu"), seed=0))
        biases = {n for n, p in seg.backbone.named_parameters() if n.endswith("bias")}
        trainable = {n for n, p in seg.backbone.named_parameters() if p.requires_grad}
        assert trainable == biases and biases  # every bias (norms' included by default) and nothing else
        assert method.trainable_backbone_params(seg) == sum(p.numel() for n, p in seg.backbone.named_parameters()
                                                            if n in biases)
        build_method("bitfit", {"norms": False}).apply(seg, MethodContext(device=torch.device("cpu"), seed=0))
        without_norms = {n for n, p in seg.backbone.named_parameters() if p.requires_grad}
        assert without_norms < biases and not any("ln_" in n or "norm" in n for n in without_norms)
    finally:
        METHODS._items.pop("bitfit", None)
