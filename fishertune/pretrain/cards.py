"""The shipped tiny models' cards, checked against today's code and files (``fishertune tiny list``, CI)."""

from __future__ import annotations

import json
from pathlib import Path

from fishertune.backbones.weights import TINY_DIR, file_sha256


def card_problems(backbone: str, folder: Path = TINY_DIR) -> list[str]:
    """Why the shipped ``backbone`` does not match today's recipe (empty: it does): a missing file or
    card, weights whose sha256 is not the card's, or a card whose recipe hash is not what the recipe's
    code and settings give today (the recipe changed without its weights being made again)."""
    from fishertune.pretrain import RECIPES

    weights, card_path = folder / f"{backbone}.safetensors", folder / f"{backbone}.json"
    if not weights.is_file() or not card_path.is_file():
        return [f"{backbone}: {weights.name} or {card_path.name} missing from {folder}; run "
                f"`fishertune tiny pretrain {backbone}`"]
    card = json.loads(card_path.read_text())
    problems = []
    if file_sha256(weights) != card["weights"]["sha256"]:
        problems.append(f"{backbone}: {weights.name} is not the file its card describes (sha256 differs)")
    cls = RECIPES.get(backbone)
    settings = card["identity"]["settings"]
    recipe = cls(cls.Config(**settings), teacher_dir=folder) if cls.needs else cls(cls.Config(**settings))
    defaults = cls(teacher_dir=folder) if cls.needs else cls()
    if card["recipe_hash"] != recipe.recipe_hash():
        problems.append(f"{backbone}: the card's recipe hash {card['recipe_hash']} is not today's for its own "
                        f"settings ({recipe.recipe_hash()}): the recipe changed; run `fishertune tiny pretrain {backbone}`")
    elif card["recipe_hash"] != defaults.recipe_hash():
        problems.append(f"{backbone}: made with settings other than the recipe's defaults; run "
                        f"`fishertune tiny pretrain {backbone}` without overrides")
    return problems


def card_rows(folder: Path = TINY_DIR) -> list[str]:
    """One line per tiny model: recipe, steps, final loss, wall time, machine, and whether it is current."""
    from fishertune.pretrain import RECIPES

    rows = []
    for name in RECIPES.names():
        path = folder / f"{name}.json"
        problems = card_problems(name, folder)
        if not path.is_file():
            rows.append(f"{name:12s} missing: {problems[0]}")
            continue
        c = json.loads(path.read_text())
        state = "current" if not problems else "STALE: " + "; ".join(problems)
        rows.append(f"{name:12s} {c['recipe']:7s} {c['steps']:5d} steps  final loss {c['final_loss']:8.4f}  "
                    f"{c['wall_time_s'] / 60:5.1f} min  torch {c['torch']}  {c['weights']['bytes'] / 2**20:.2f} MiB  "
                    f"{state}")
    return rows
