"""The tiny foundation models: the pretraining world, every recipe, the shipped files and their cards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.backbones.weights import TINY_DIR
from fishertune.pretrain import RECIPES
from fishertune.pretrain.cards import card_problems
from fishertune.pretrain.loop import pretrain, write_model
from fishertune.pretrain.world import WorldConfig, WorldPool, draw_scene, vocabulary

TINY = ["clip-tiny", "dinov2-tiny", "eva02-tiny", "mae-tiny", "sam-tiny"]
SMALL_WORLD = WorldConfig(seed=0, size=48)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain-cache")
    WorldPool(SMALL_WORLD, path, progress=False, workers=1)
    return path


def test_every_family_has_a_recipe_for_its_tiny_variant():
    assert sorted(RECIPES.names()) == TINY
    for name in TINY:
        spec = BACKBONES.get(name)
        assert spec.shipped and spec.weights == f"{name}.safetensors"


def test_world_scenes_are_deterministic_and_give_segments_and_captions():
    a, b, c = draw_scene(0, 5), draw_scene(0, 5), draw_scene(1, 5)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image) if a.image.shape == c.image.shape else True
    assert a.segments.shape == a.image.shape[:2] and a.segments.max() > 5  # many class-agnostic regions
    words = set(vocabulary())
    assert set(a.caption.replace(",", " ").split()) <= words


def test_a_world_with_shuffled_looks_changes_only_the_colours_of_its_share_of_scenes(tmp_path):
    plain = [draw_scene(0, i) for i in range(12)]
    half = [draw_scene(0, i, shuffled_looks=0.5) for i in range(12)]
    changed = [not np.array_equal(a.image, b.image) for a, b in zip(plain, half)]
    assert 2 <= sum(changed) <= 10  # about half, decided per scene
    assert all(np.array_equal(a.segments, b.segments) and a.caption == b.caption for a, b in zip(plain, half))
    # a world setting added later stays out of the recipe hash at its default (the shipped cards keep theirs)
    assert "shuffled_looks" not in WorldConfig().identity() and WorldConfig(shuffled_looks=0.5).identity()["shuffled_looks"]
    cls = RECIPES.get("mae-tiny", "test")
    assert cls(cls.Config(world=WorldConfig(shuffled_looks=0.5))).recipe_hash() != cls().recipe_hash()
    pool = WorldPool(WorldConfig(size=4, shuffled_looks=1.0), tmp_path, progress=False, workers=1)
    assert pool.path.name.endswith("-looks1.npz") and not np.array_equal(pool.image(0), plain[0].image)


def test_world_never_draws_a_benchmark_image(synth_root):
    """No scene of the world is an image of the miniature (the seed sequences differ in shape and tag)."""
    from PIL import Image

    bench = {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in synth_root.rglob("*.png")
             if "leftImg8bit" in p.name or "rgb_anon" in p.name or "/images/" in p.as_posix()}
    world = {draw_scene(0, i).image.tobytes() for i in range(8)}
    assert bench and not bench & world


@pytest.mark.parametrize("name", TINY)
def test_a_short_pretraining_lowers_the_loss(name, cache, tmp_path, one_thread):
    """Each recipe, a few dozen steps on a small world: the loss of the last steps is below the first's.
    (The CLIP teacher of EVA-02 is the shipped one.)"""
    cls = RECIPES.get(name)
    overrides = dict(steps=24, batch_size=8, warmup=2, world=SMALL_WORLD)
    if name == "dinov2-tiny":  # a fixed teacher temperature: the warm-up schedule raises the loss at first
        overrides.update(teacher_temp=(0.07, 0.07), local_crops=2)
    recipe = cls(cls.Config(**overrides), teacher_dir=TINY_DIR) if cls.needs else cls(cls.Config(**overrides))
    trainer, record = pretrain(recipe, cache, progress=False, log_every=4)
    losses = [loss for _, loss in record["losses"]]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    weights, card = write_model(recipe, trainer, record, tmp_path, "test")
    # the file loads through the family's own loader, like an official checkpoint
    model = build_backbone(name, weights=weights, img_size=96)
    loaded, trained = model.qkv()[0], trainer.backbone.qkv()[0]
    assert torch.equal(getattr(loaded.module, loaded.weight), getattr(trained.module, trained.weight).half().float())
    assert json.loads(card.read_text())["recipe_hash"] == recipe.recipe_hash()


@pytest.mark.parametrize("name", TINY)
def test_shipped_model_is_current_small_and_loads(name):
    """The committed file is what its card says, made by today's recipe with its default settings (a recipe
    changed without making its weights again fails here), at most 4 MiB, and loads as pretrained."""
    assert card_problems(name) == []
    path = TINY_DIR / f"{name}.safetensors"
    assert path.stat().st_size <= 4 * 2**20
    card = json.loads((TINY_DIR / f"{name}.json").read_text())
    for key in ("recipe", "recipe_hash", "steps", "final_loss", "wall_time_s", "machine", "torch", "command"):
        assert card[key] not in (None, "")
    pretrained = build_backbone(name, pretrained=True, seed=0)
    random = build_backbone(name, pretrained=False, seed=0)
    differ = [k for k, v in pretrained.state_dict().items() if not torch.equal(v, random.state_dict()[k])]
    assert len(differ) > 0.9 * len(random.state_dict())
