"""Full fine-tuning: every backbone parameter trains (the paper's "Full" row)."""

from fishertune.tuning import TuningMethod, register_method


@register_method
class Full(TuningMethod):
    name = "full"
    paper = "baseline of Rein, https://arxiv.org/abs/2312.04265 (Table 1)"

    def apply(self, segmentor, ctx) -> None:
        segmentor.backbone.requires_grad_(True)
