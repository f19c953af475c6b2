"""The tiny foundation models of the miniature, and how the suite makes them (``fishertune tiny pretrain``).

One room for everything pretraining: :mod:`.world` (the pretraining world: scenes of the street
generator under styles far beyond the benchmark's domains, with class-agnostic segments and captions),
:mod:`.loop` (settings, optimisation, the shipped file and its card) and one recipe per family,
following that family's real pretraining as far as a CPU allows:

=============  ==========================================================================
``mae-tiny``    :mod:`.mae`: masked-patch pixel reconstruction (75% masked, light decoder)
``dinov2-tiny`` :mod:`.dinov2`: self-distillation between views with an EMA teacher (DINO + iBOT)
``clip-tiny``   :mod:`.clip`: image-text contrast against a tiny text tower on generated captions
``sam-tiny``    :mod:`.sam`: class-agnostic masks from point prompts, SAM's prompt encoder and decoder
``eva02-tiny``  :mod:`.eva02`: masked prediction of a frozen CLIP-tiny's features (MIM, CLIP teacher)
=============  ==========================================================================

No objective uses the benchmark's 19-class labels. The results ship as
``fishertune/backbones/tiny/<backbone>.safetensors`` in each family's official checkpoint layout, read
by the same loaders as the full-size checkpoints, with a JSON card beside each.
"""

from __future__ import annotations

from fishertune.pretrain.loop import Recipe
from fishertune.registry import Registry

RECIPES: Registry[type[Recipe]] = Registry("tiny model")


def _register() -> None:
    from fishertune.pretrain import clip, dinov2, eva02, mae, sam

    # in dependency order (EVA-02 distils CLIP)
    for cls in (clip.CLIPRecipe, dinov2.DINOv2Recipe, eva02.EVA02Recipe, mae.MAERecipe, sam.SAMRecipe):
        RECIPES.register(cls.backbone, cls)


_register()

__all__ = ["RECIPES", "Recipe"]
