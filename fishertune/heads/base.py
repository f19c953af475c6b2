"""The decode-head interface and registry.

A head takes the backbone's four feature maps and offers ``predict(features) -> scores`` (per-pixel
class scores, ``B x K x h x w`` at any stride; the segmentor resizes them) and
``losses(features, labels) -> dict[str, Tensor]`` (summed by the segmentor). Heads are registered by
name and built from their manifest config with ``build_head``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from torch import nn

from fishertune.data.labels import IGNORE_INDEX
from fishertune.errors import UserError
from fishertune.registry import Registry

HEADS: Registry[type] = Registry("head")


class DecodeHead(nn.Module):
    """Base class of decode heads."""

    def predict(self, features: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def losses(self, features: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def check_head(name: str, cfg: dict, where: str = "") -> type[DecodeHead]:
    """The head class of ``name``, after checking ``cfg`` before any data is read: an option it does not take,
    a value of the wrong type, a negative or non-finite number, or a combination the head refuses when built
    (on the meta device: no memory) is a one-line user error."""
    cls = HEADS.get(name, where)
    at = f"{where}: " if where else ""
    params = {k: p for k, p in inspect.signature(cls, eval_str=True).parameters.items()
              if k not in ("in_channels", "num_classes")}
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise UserError(f"{at}head {name!r} has no option {unknown[0]!r}; its options are: {', '.join(params)}")
    for key, value in cfg.items():
        kind = params[key].annotation
        number = Annotated[kind, Field(ge=0, allow_inf_nan=False)] if kind in (int, float) else kind
        try:
            TypeAdapter(number, config=ConfigDict(strict=True)).validate_python(value)
        except ValidationError as e:
            raise UserError(f"{at}head {name!r} option {key!r}: {e.errors()[0]['msg']} (got {value!r})") from None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. zero-element tensors on the meta device
            cls(in_channels=64, num_classes=2, **cfg)
    except ValueError as e:
        raise UserError(f"{at}head {name!r}: {e}") from None
    return cls


def build_head(name: str, in_channels: int, num_classes: int, where: str = "", **cfg) -> DecodeHead:
    return check_head(name, cfg, where)(in_channels=in_channels, num_classes=num_classes, **cfg)


def mean_over_processes(count, device: torch.device):
    """``count`` (of masks, of labelled pixels; an int or a tensor) averaged over the processes of a
    distributed run, at least 1, as Mask2Former normalises its mask losses: each process's summed loss
    divided by the average count makes DDP's mean of the gradients the gradient of the global batch's
    loss. A tensor stays on its device (no wait for the GPU); one process: ``count`` itself."""
    from torch import distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # made on the device (a tensor from a host number would be a copy the step waits for)
        total = (count.to(torch.get_default_dtype()).clone() if isinstance(count, torch.Tensor)
                 else torch.full((), float(count), dtype=torch.get_default_dtype(), device=device))
        dist.all_reduce(total)
        return (total / dist.get_world_size()).clamp(min=1.0)
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)


def pixel_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-pixel heads' loss (``light``, ``linear``): ``scores`` resized bilinearly to the label size,
    cross-entropy summed over labelled pixels (255 ignored) and divided by their count averaged over the
    processes (one process: ``F.cross_entropy``'s mean)."""
    logits = F.interpolate(scores, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    labels = labels.long()
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return {"loss_ce": total / mean_over_processes((labels != IGNORE_INDEX).sum(), labels.device)}
