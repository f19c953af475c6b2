"""ChildTuning-D (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model"): a fixed Fisher mask.

Before training, one pass over the source training data estimates each candidate element's Fisher
information from squared batch gradients, and a global threshold keeps the top-k elements, the
"child network"; only those train, the mask fixed for the whole run. ChildTuning's code
(``calculate_fisher`` in its ``run_glue.py``, as we know it) does, over the N batches of its training
loader in train mode:

    for each batch:  L = batch loss;  L.backward()
        for each candidate parameter p:  clip_grad_norm_(p, max_grad_norm);  F_p += grad_p ** 2 / N
    threshold = percentile(all F, (1 - reserve_p) * 100);  mask_p = F_p >= threshold

Here, the same per element: F = (1 / N) sum_batches clip(g_batch)^2, where clip rescales *each
parameter's* gradient to norm at most ``max_grad_norm`` (as ``torch.nn.utils.clip_grad_norm_`` on that
one parameter: factor min(1, max / (||g|| + 1e-6))) before squaring; then
:func:`~fishertune.fisher.sparse.topk_mask` keeps exactly k elements.

Assumptions (where our setting differs from GLUE, or the paper leaves it open):
- Candidates: every parameter inside the backbone's transformer blocks (ChildTuning's code takes
  parameters whose name contains ``layer``, i.e. BERT's encoder layers; the embeddings and the task
  head are not candidates). The decode head always trains, densely, as in every method here.
- Budget: k = round(budget x the whole backbone's parameter count) (5% -> 15.21M on ViT-L, the
  FisherTune table's number; see ``fishertune.fisher.sparse``), instead of ChildTuning's percentile,
  which can keep more than the share on ties; ties are broken deterministically.
- Data: "one pass" = ceil(source_images / batch) batches of the run's seeded, augmented training
  stream (the same crops and photometric changes as training, seed + 1 as every method's source
  data), the last batch cut to the remaining images as a loader without drop_last would; the loss is
  the decode head's training loss on the ground-truth labels (ChildTuning-D uses the task loss, i.e.
  the empirical Fisher), with the model in train mode (dropout, drop path) as in their code.
- Updates: ChildTuning's optimizer multiplies the dense gradient by the mask but still applies weight
  decay to every element; here only the selected elements change (weight decay included) and the
  optimizer keeps state for them alone (:class:`~fishertune.fisher.sparse.SparseAdamW`), the sparse
  protocol FisherTune compares against, so that the trainable count is k.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fishertune.fisher.sparse import block_parameters, budget_elements, topk_mask
from fishertune.precision import to_compute
from fishertune.progress import bar
from fishertune.tuning import MethodConfig, TuningMethod, register_method

BUDGET_FIELD = "method 'childtune' config field 'budget'"


class ChildTuneConfig(MethodConfig):
    budget: float = Field(0.05, gt=0, le=1, description="fraction of the backbone's parameters that train, chosen "
                                                        "among its blocks' elements (ChildTuning's reserve_p; 0.05 "
                                                        "gives the FisherTune table's 15.21M on ViT-L)")
    images: int | None = Field(None, gt=0, description="source images for the Fisher pass; None = one pass over "
                                                       "the whole source training set, as ChildTuning-D's "
                                                       "calculate_fisher over its training loader")
    max_grad_norm: float | None = Field(1.0, gt=0, description="each parameter's gradient is clipped to this norm "
                                                               "before squaring (ChildTuning's calculate_fisher "
                                                               "with max_grad_norm 1.0); None = no clipping")


def squared_gradient_scores(segmentor: torch.nn.Module, params: dict[str, torch.nn.Parameter], batches,
                            images: int, device: torch.device, max_grad_norm: float | None,
                            desc: str = "childtune fisher") -> tuple[dict[str, torch.Tensor], int]:
    """ChildTuning-D's Fisher: (1 / N) sum over N batches of each element's squared (clipped) batch gradient.

    Reads batches until ``images`` images have been seen (the last batch cut to the remainder). Only
    ``params`` get gradients during the pass (the other parameters' ``requires_grad`` is restored
    afterwards); gradients are cleared and the model left in train mode. Returns (scores in the compute
    dtype, float32 or float64 in an fp64 cell, shaped as the parameters, N).
    """
    flags = [(p, p.requires_grad) for p in segmentor.parameters()]
    chosen = {id(p) for p in params.values()}
    scores = {name: torch.zeros_like(p, dtype=torch.get_default_dtype()) for name, p in params.items()}
    tensors = list(params.values())
    n_batches = seen = 0
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        segmentor.train()
        progress = bar(total=images, desc=desc, unit="img")
        for x, y in batches:
            x, y = x[: images - seen], y[: images - seen]
            x, y = to_compute(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            segmentor.loss(x, y).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
            if max_grad_norm is not None:
                norms = torch._foreach_norm(grads)
                coefs = [torch.clamp(max_grad_norm / (n + 1e-6), max=1.0) for n in norms]
                torch._foreach_mul_(grads, coefs)
            torch._foreach_addcmul_(list(scores.values()), grads, grads)  # grads in the compute dtype: exact g * g
            for p in tensors:
                p.grad = None
            n_batches += 1
            seen += x.shape[0]
            progress.update(x.shape[0])
            if seen >= images:
                break
        progress.close()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        segmentor.train()
    if seen < images:
        raise RuntimeError(f"the source batches ended after {seen} of {images} images")
    torch._foreach_div_(list(scores.values()), float(n_batches))
    return scores, n_batches


@register_method
class ChildTune(TuningMethod):
    """ChildTuning-D: a Fisher-selected, fixed element mask on the blocks; see the module docstring."""

    name = "childtune"
    paper = "https://arxiv.org/abs/2109.05687"
    Config = ChildTuneConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.mask: dict[str, torch.Tensor] | None = None

    def apply(self, segmentor, ctx) -> None:
        backbone = segmentor.backbone
        budget_elements(backbone, self.cfg.budget, BUDGET_FIELD)  # a bad budget fails before any data is read
        backbone.requires_grad_(False)
        for p in block_parameters(backbone).values():  # need gradients; only the mask's elements update
            p.requires_grad_(True)

    def before_training(self, segmentor, ctx) -> None:
        cfg: ChildTuneConfig = self.cfg
        if ctx.source_batches is None:
            raise RuntimeError("childtune: the MethodContext has no source_batches; the Fisher pass needs "
                               "source data")
        images = cfg.images if cfg.images is not None else ctx.source_images
        if images is None:
            raise RuntimeError("childtune: images is None (one pass over the source) but the MethodContext "
                               "has no source_images")
        params = block_parameters(segmentor.backbone)
        k = budget_elements(segmentor.backbone, cfg.budget, BUDGET_FIELD)
        # at most `images` batches (of at least one image each); the loop stops once `images` are seen
        scores, _ = squared_gradient_scores(segmentor, params, ctx.source_batches(images), images, ctx.device,
                                            cfg.max_grad_norm)
        self.mask = topk_mask(scores, k)

    def sparse_indices(self, segmentor) -> dict[str, torch.Tensor]:
        if self.mask is None:
            raise RuntimeError("childtune: sparse_indices before before_training (the mask is chosen there)")
        return self.mask

    def trainable_backbone_params(self, segmentor) -> int:
        return budget_elements(segmentor.backbone, self.cfg.budget, BUDGET_FIELD)

