"""Frozen backbone: only the decode head trains (the paper's "Freeze" row, 0 trainable backbone params)."""

from fishertune.tuning import TuningMethod, register_method


@register_method
class Freeze(TuningMethod):
    name = "freeze"
    paper = "baseline of Rein, https://arxiv.org/abs/2312.04265 (Table 1)"

    def apply(self, segmentor, ctx) -> None:
        segmentor.backbone.requires_grad_(False)
