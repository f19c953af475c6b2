"""Tuning methods: the interface, the registry and how a method's config is validated.

A method is a :class:`TuningMethod` subclass with a ``name``, a ``paper`` link and a pydantic
``Config`` whose fields carry help text (PEFT style). ``apply`` decides what trains in the backbone
(and may insert modules into it); optional hooks act before training (with data from the context,
e.g. Fisher estimation) and after each backward pass (e.g. gradient masks). The decode head always
trains. Adding a baseline is one module in ``baselines/`` with ``@register_method`` and one manifest
line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fishertune.errors import UserError
from fishertune.registry import Registry


class MethodConfig(BaseModel):
    """Base of method configs: unknown fields, wrong types and non-finite numbers are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


@dataclass
class MethodContext:
    """What a method may use besides the model: the device, the seed, and source data on demand."""

    device: torch.device
    seed: int
    source_batches: Callable[[int], Any] | None = None  # n -> iterable of n (images, labels) batches
    source_images: int | None = None  # size of the source training set (for "one pass over source data")
    cache_dir: Path | None = None  # where a method may keep what it computes once per model and data
    #: what identifies the model and the source batches (backbone, weights file, head, seed, data,
    #: augmentation), for the cache keys of such methods; empty: do not cache
    identity: dict[str, Any] = field(default_factory=dict)


class TuningMethod:
    """Base class; subclasses set ``name``, ``paper``, ``Config`` and implement :meth:`apply`."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, cfg: MethodConfig | None = None):
        self.cfg = cfg if cfg is not None else self.Config()

    def apply(self, segmentor: torch.nn.Module, ctx: MethodContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def before_training(self, segmentor: torch.nn.Module, ctx: MethodContext) -> None:
        """Runs once after :meth:`apply`, before the first step (e.g. Fisher estimation)."""

    def after_backward(self, segmentor: torch.nn.Module, iteration: int) -> None:
        """Runs after every backward pass, before the optimizer step (e.g. gradient masks)."""

    def sparse_indices(self, segmentor: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Parameters (named as in ``segmentor.named_parameters()``) that train only at these flat element
        indices (sorted, unique, int64); the optimizer keeps state for those elements alone. Called after
        :meth:`before_training`. Default: none, every trainable parameter trains densely."""
        return {}

    def sparse_growth(self, segmentor: torch.nn.Module, iteration: int, iterations: int) -> dict[str, torch.Tensor] | None:
        """Called before the optimizer step of ``iteration`` (0-based, of ``iterations``): sparse indices
        that replace :meth:`sparse_indices` from this step on (each a superset of the current ones), or
        ``None`` to keep them (the default: a fixed mask)."""
        return None

    def trainable_backbone_params(self, segmentor: torch.nn.Module) -> int:
        """The paper's "Trainable Params" column: what trains on the backbone side (a sparse parameter
        counts its selected elements)."""
        sparse = self.sparse_indices(segmentor)
        return sum(sparse[name].numel() if name in sparse else p.numel()
                   for name, p in segmentor.backbone.named_parameters(prefix="backbone") if p.requires_grad)


def parameter_counts(segmentor: torch.nn.Module, method: TuningMethod) -> dict[str, int]:
    """Backbone and head parameters, total and trainable, after ``method.apply`` (the paper's column is
    ``backbone_trainable``); recorded in every result and listed by ``fishertune params``."""
    return {
        "backbone_total": sum(p.numel() for p in segmentor.backbone.parameters()),
        "backbone_trainable": method.trainable_backbone_params(segmentor),
        "head_total": sum(p.numel() for p in segmentor.head.parameters()),
        "head_trainable": sum(p.numel() for p in segmentor.head.parameters() if p.requires_grad),
    }


METHODS: Registry[type[TuningMethod]] = Registry("method")


def register_method(cls: type[TuningMethod]) -> type[TuningMethod]:
    """Class decorator: register a method under its ``name``."""
    METHODS.register(cls.name, cls)
    return cls


def _load_baselines() -> None:
    import baselines  # noqa: F401  (importing registers every baseline)
    import fishertune.fisher.method  # noqa: F401  (FisherTune itself)


def method_class(name: str, where: str = "") -> type[TuningMethod]:
    _load_baselines()
    return METHODS.get(name, where)


def build_method(name: str, config: dict[str, Any] | None = None, where: str = "") -> TuningMethod:
    """Instantiate ``name`` with a validated config; bad fields are a one-line user error."""
    cls = method_class(name, where)
    try:
        cfg = cls.Config(**(config or {}))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(str(err["loc"][-1]), list(cls.Config.model_fields), n=1)
            msg = f"unknown field; {f'did you mean {close[0]!r}? ' if close else ''}fields: " \
                  f"{', '.join(cls.Config.model_fields)}"
        raise UserError(f"{where}: method {name!r} config field {loc!r}: {msg}") from None
    return cls(cfg)


def registered_methods() -> list[str]:
    _load_baselines()
    return METHODS.names()
