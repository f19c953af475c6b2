"""The decode-head interface and registry.

A head takes the backbone's four feature maps and offers ``predict(features) -> scores`` (per-pixel
class scores, ``B x K x h x w`` at any stride; the segmentor resizes them) and
``losses(features, labels) -> dict[str, Tensor]`` (summed by the segmentor). Heads are registered by
name and built from their manifest config with ``build_head``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

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
    """The head class of ``name``; an option it does not take is a one-line user error naming the ones it does."""
    cls = HEADS.get(name, where)
    options = [p for p in inspect.signature(cls).parameters if p not in ("in_channels", "num_classes")]
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        at = f"{where}: " if where else ""
        raise UserError(f"{at}head {name!r} has no option {unknown[0]!r}; its options are: {', '.join(options)}")
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
        total = (count.to(torch.float32).clone() if isinstance(count, torch.Tensor)
                 else torch.full((), float(count), dtype=torch.float32, device=device))
        dist.all_reduce(total)
        return (total / dist.get_world_size()).clamp(min=1.0)
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)
