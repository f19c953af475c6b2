"""What every recipe shares: its settings and hash, the optimisation loop, and the shipped file and card.

A recipe (:class:`Recipe`) builds a *trainer* module (the family's tiny backbone plus whatever its
objective needs: decoders, heads, a text tower, an EMA teacher), draws a batch from the pretraining
world, computes the loss, and finally exports the backbone in its family's official checkpoint
layout. :func:`pretrain` runs it: AdamW (no weight decay on norms, biases, positions and tokens),
linear warm-up then cosine decay, gradient clipping at 1.0, a fixed thread count and seed, and a
progress bar with the loss. The backbone is written as fp16 safetensors to
``fishertune/backbones/tiny/<backbone>.safetensors`` (fp16 as OpenAI's CLIP files are, to stay well
under the 4 MiB a shipped file may take; the loaders cast to fp32) with a JSON card beside it.

The card's ``recipe_hash`` covers everything that decides the weights: the recipe's name, its
``version`` (bumped when its code changes what it computes), its settings, the world's version, the
backbone's architecture and, for a distilled model, the teacher file's hash. ``tests/test_pretrain.py``
recomputes it from today's code: a recipe changed without regenerating its weights fails CI.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fishertune.backbones.weights import TINY_DIR  # noqa: F401  (where write_model's callers put them)
from fishertune.pretrain.world import VERSION as WORLD_VERSION
from fishertune.pretrain.world import WorldConfig, WorldPool, config_digest
from fishertune.progress import bar

#: ImageNet mean and std (0..255), as the benchmark's transforms normalise
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


class RecipeConfig(BaseModel):
    """Settings every recipe has; each recipe's Config adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(gt=0, description="optimiser steps")
    batch_size: int = Field(gt=0, description="scenes per step")
    lr: float = Field(gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (none on norms, biases, positions, tokens)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    warmup: int = Field(50, ge=0, description="linear warm-up steps, then cosine decay to 0")
    image_size: int = Field(64, gt=0, description="side of the square crops the backbone sees")
    seed: int = Field(0, description="seed of initialisation, crops and masks")
    world: WorldConfig = Field(WorldConfig(), description="the pool of scenes")


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """``N x H x W x 3`` uint8 -> normalised ``N x 3 x H x W`` float."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return (x - MEAN) / STD


class Recipe:
    """One family's pretraining objective (subclasses set the class attributes and the four methods)."""

    name: ClassVar[str]
    backbone: ClassVar[str]  # the tiny variant it makes, e.g. "mae-tiny"
    version: ClassVar[int] = 1
    Config: ClassVar[type[RecipeConfig]] = RecipeConfig
    #: recipes whose shipped weights this one reads (EVA-02 distils CLIP)
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: RecipeConfig | None = None):
        self.cfg = cfg if cfg is not None else self.Config()

    def build(self) -> nn.Module:  # pragma: no cover - abstract
        """The trainer: a module whose ``backbone`` attribute is the tiny variant being pretrained."""
        raise NotImplementedError

    def loss(self, trainer: nn.Module, pool: WorldPool, rng: np.random.Generator, step: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, trainer: nn.Module, step: int) -> None:
        """After each optimiser step (an EMA teacher's update)."""

    def export(self, trainer: nn.Module) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """The backbone's state dict in its family's official layout (what the family's loader reads)."""
        raise NotImplementedError

    def extra_identity(self) -> dict[str, Any]:
        """What else decides the weights (a teacher file's hash)."""
        return {}

    def identity(self) -> dict[str, Any]:
        return {"recipe": self.name, "version": self.version, "backbone": self.backbone,
                "architecture": architecture(self.backbone), "world_version": WORLD_VERSION,
                "settings": self.cfg.model_dump(mode="json") | {"world": self.cfg.world.identity()},
                **self.extra_identity()}

    def recipe_hash(self) -> str:
        return config_digest(self.identity())


def architecture(backbone: str) -> dict[str, Any]:
    """The tiny variant's shape, as built (class, width, depth, heads, patch): part of the recipe hash."""
    from fishertune.backbones import build_backbone

    with torch.device("meta"):
        model = build_backbone(backbone, pretrained=False)
    return {"class": type(model).__name__, "embed_dim": model.embed_dim, "depth": model.num_layers,
            "patch_size": model.patch_size, "parameters": sum(p.numel() for p in model.parameters())}


def no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or any(k in name for k in ("pos", "token", "embedding", "logit_scale", "rel_pos"))


def cosine(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def pretrain(recipe: Recipe, cache: Path, threads: int | None = None, progress: bool = True,
             log_every: int = 10) -> tuple[nn.Module, dict[str, Any]]:
    """Run ``recipe``; returns the trainer and a record (losses, time) for the card."""
    cfg = recipe.cfg
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        pool = WorldPool(cfg.world, cache, progress=progress)
        torch.manual_seed(cfg.seed)
        trainer = recipe.build()
        named = [(n, p) for n, p in trainer.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine(s, cfg.steps, cfg.warmup))
        rng = np.random.default_rng([cfg.seed, 7])
        losses: list[tuple[int, float]] = []
        window: list[float] = []
        started = time.perf_counter()
        trainer.train()
        steps = bar(range(cfg.steps), desc=f"pretrain {recipe.backbone}", unit="step")
        for step in steps:
            loss = recipe.loss(trainer, pool, rng, step)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{recipe.name}: non-finite loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            optimizer.step()
            schedule.step()
            recipe.after_step(trainer, step)
            window.append(loss.item())
            if len(window) == log_every or step == cfg.steps - 1:
                losses.append((step + 1, float(np.mean(window))))
                window = []
                steps.set_postfix(loss=f"{losses[-1][1]:.4f}")
        record = {"steps": cfg.steps, "losses": losses, "final_loss": losses[-1][1],
                  "wall_time_s": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(),
                  "world_sha256": pool.fingerprint()}
        return trainer, record
    finally:
        torch.set_num_threads(before)


def machine() -> str:
    from fishertune.runner.environment import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def write_model(recipe: Recipe, trainer: nn.Module, record: dict[str, Any], out: Path, command: str) -> tuple[Path, Path]:
    """Write ``<backbone>.safetensors`` (fp16, official layout) and ``<backbone>.json`` (the card) into
    ``out``, each atomically; returns their paths."""
    from safetensors.torch import save_file

    from fishertune.backbones.weights import file_sha256
    from fishertune.runner.environment import git_state
    from fishertune.runner.store import atomic_write, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{recipe.backbone}.safetensors"
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in recipe.export(trainer).items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"recipe": recipe.name,
                                                                        "recipe_hash": recipe.recipe_hash()}))
    card = {
        "backbone": recipe.backbone,
        "recipe": recipe.name,
        "recipe_hash": recipe.recipe_hash(),
        "identity": recipe.identity(),
        "weights": {"file": weights.name, "bytes": weights.stat().st_size, "sha256": file_sha256(weights),
                    "dtype": "float16", "tensors": len(state)},
        **record,
        "machine": machine(),
        "torch": torch.__version__,
        "command": command,
        "git": git_state(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / f"{recipe.backbone}.json"
    atomic_write_text(path, json.dumps(card, indent=1) + "\n")
    return weights, path


