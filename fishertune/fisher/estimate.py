"""Fisher estimation for FisherTune (DESIGN section 5; issue 7 items 1 and 2): direct and variational
estimates of the diagonal Fisher, on x and on a domain-shifted view x', and their DR-FIM combinations.

Direct (:func:`direct_fisher`). The diagonal of

    F = E_x E_{y ~ f(y|x)} [grad L(f(x), y) * grad L(f(x), y)]          (elementwise square)

estimated from squared *per-image* gradients averaged over the N images seen:
F_i = (1 / (N D)) sum_n sum_d (dL(x_n, y_nd) / dtheta_i)^2, one backward pass per image (the images of
a batch are taken one at a time: exact per-sample gradients, no vmap), accumulated in the compute
dtype (float32; float64 in an fp64 cell) in tensors shaped like the parameters. L(x, y) is the
segmentor's own training loss
(``segmentor.loss(x[n:n+1], y[n:n+1])``, e.g. the mean per-pixel cross-entropy of the light head or
Mask2Former's matched losses), so a "sample" is one image and its label map, not one pixel.
Labels:
- ``"empirical"``: y = the ground truth (the empirical Fisher);
- ``"model"`` (the slide's definition): y drawn per pixel from the model's own predictive
  distribution f(y|x) at the current weights, D draws per image (``label_draws``, default 1, a
  one-sample Monte Carlo estimate of the inner expectation as is usual). f(y|x) is the softmax over
  the class scores of ``segmentor(images)`` (logits at the input size), or, for heads whose scores are
  already non-negative class weights (Mask2Former's ``sum_q softmax(class) sigmoid(mask)``), those
  scores normalised to sum to one per pixel (``scores="auto"`` tells them apart by the head's class;
  override with ``"logits"`` / ``"probabilities"``). Pixels whose ground truth is 255 stay 255
  (ignored). Draws are by inverse CDF from uniforms of the generator passed in.
With a ``shift`` (:mod:`fishertune.fisher.shift`), each batch is shifted once (x' from the batch and
the generator), and F(x) and F(x') are accumulated on the same images with the same labels (model
labels: drawn once from f(y|x) and reused for x'); eps_mu, eps_sigma are the shifts' sizes averaged
over the images.

The model is in eval mode during estimation (no dropout, no drop path, BatchNorm running statistics:
the gradients are those of the deterministic network whose parameters are being rated; ChildTuning's
batch Fisher uses train mode, FisherTune's paper does not say); each module's mode is restored
afterwards. Only the rated parameters require gradients during the pass (the others' flags are
restored), and every gradient is None afterwards.

Variational (:func:`variational_fisher`). q(theta) = N(theta_hat, diag(Lambda)^-1), prior
p(theta) = N(theta_pre, tau^2 I) at the pretrained weights; minimise

    E_q[L(theta)] + gamma KL(q || p),
    KL = 1/2 sum_i [1 / (Lambda_i tau^2) + (theta_hat_i - theta_pre_i)^2 / tau^2 - 1 + ln Lambda_i + 2 ln tau]

by Adam on theta_hat and s = ln Lambda. Weights are sampled by reparametrisation, theta = theta_hat + e /
sqrt(Lambda), e ~ N(0, I), ``samples`` draws per step, each with its antithetic -e by default (which
cancels the first-order noise term g . e / sqrt(Lambda) of the gradient); the KL's gradient is closed
form. L at step t is the training loss of batch t mod B of the (materialised) batches, so the objective
is the mean loss over the batches seen. The slide writes E_q[L] ~ L(theta_hat) + 1/2 Tr(F Lambda^-1),
whose optimum is Lambda = F / gamma + tau^-2, and the Fisher estimate is

    F ~ gamma (Lambda - tau^-2)

(not clamped: it can be slightly negative where sampling noise leaves Lambda below tau^-2). How the
s-gradient sees the curvature (``curvature``):
- ``"fisher"`` (default): the slide's expansion taken literally, d/ds 1/2 Tr(F Lambda^-1) = -F / (2 Lambda)
  with F the mean of the squared per-image gradients at the sampled theta (one backward pass per image,
  as the direct estimator), the mean's gradient the mean of those gradients. This is variational online
  Gauss-Newton (Khan et al. 2018, arXiv:1806.04854): the curvature of E_q[L] is replaced by the Fisher
  at the samples. Lambda then settles at E_q[F] / gamma + tau^-2.
- ``"sampled"``: the reparametrisation gradient of E_q[L] itself, the chain rule through the sample written
  out (dtheta/dtheta_hat = 1, dtheta/ds = -e / (2 sqrt(Lambda))). With the antithetic pair this is
  -e_i (H e)_i / (2 Lambda_i) to second order: a Hutchinson probe of the Hessian's diagonal, whose noise is
  the rest of the Hessian's row i. On a network with a million weights that noise drowns the diagonal:
  on the miniature two seeds' DR-FIM masks shared 5% of their elements after 20 and after 200 steps, what
  two random masks share, where ``"fisher"`` masks shared 38-50% after 5 steps
  (``benchmarks/mini/estimate_steps.py``, ``results/perf/mini-estimate-steps.md``). On a small problem it
  does converge to the Hessian's diagonal (``tests/test_fisher_estimate.py``); it is kept for that
  comparison.
Choices (the paper gives none):
- Lambda starts at ``init_scale`` tau^-2 (default 1: q starts with the prior's variance, the optimum of
  an element that carries no information), theta_hat at the current (pretrained) weights.
- theta_hat is optimised (the slide's q has a free mean; ``optimise_mean=False`` holds it at the
  pretrained weights), with its own learning rate ``mean_lr``, small, so that the mean does not
  drift into a fine-tuned model whose Fisher would be another one.
- Adam at a constant learning rate; Lambda is read out as 1 / mean(Lambda^-1) over the last
  (1 - ``average_from``) of the steps (Polyak averaging of the variance: the last iterate keeps the
  noise of one step, and since the expected s-gradient, (gamma - (F + gamma tau^-2) / Lambda) / 2, is
  linear in 1 / Lambda, it is the mean of 1 / Lambda, not of Lambda, that settles at its optimum).
- Sampled weights are written into the parameters in place (under no_grad) and the original tensors
  are copied back at the end, bit-identical, also on error. The noise e comes from a generator on the
  parameters' device seeded from the generator passed in, so runs are deterministic per device; the
  run on x' reuses the run on x's seed (common random numbers, which lowers the noise of
  Lambda_x - Lambda_x').
- Scale: with ``curvature="sampled"`` the variational estimate approximates the Hessian of the mean
  loss, the direct one (and ``"fisher"``) the mean of squared per-image gradients; for a per-pixel loss
  averaged over P pixels these differ by about a factor P (cross-pixel terms aside), so do not mix the
  two curvatures' numbers; a top-k selection within one estimator is unaffected.

DR-FIM. :func:`delta_fim` is the slide's Delta F = |F(x) - F(x')| / (min(F(x), F(x')) + eps);
:func:`dr_fim` is F(x) + exp(-(eps_mu + eps_sigma)) Delta F; :func:`dr_fim_variational` is
gamma (Lambda_x - tau^-2 + exp(-(eps_mu + eps_sigma)) |Lambda_x - Lambda_x'| / (min(Lambda_x, Lambda_x')
+ eps / gamma)), all per element over dicts of tensors.

Caches. :class:`FisherEstimate` saves to one safetensors file (tensors under ``fisher/``,
``fisher_shift/``, ``precision/``, ``precision_shift/`` + the parameter name; scalars and the config
as JSON strings in the metadata, with the parameters' order), which loads without running code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from fishertune.errors import UserError
from fishertune.fisher.shift import DomainShift
from fishertune.precision import to_compute
from fishertune.progress import bar
from fishertune.tensorfile import DamagedFile, first_line, load_safetensors

IGNORE_INDEX = 255
FORMAT = "fishertune.fisher/1"
GROUPS = ("fisher", "fisher_shift", "precision", "precision_shift")

Tensors = dict[str, torch.Tensor]
LabelMode = Literal["empirical", "model"]
ScoreKind = Literal["auto", "logits", "probabilities"]


# --------------------------------------------------------------------------------------------- result
@dataclass
class FisherEstimate:
    """Per-parameter estimates (in the compute dtype: float32, float64 in an fp64 cell; shaped like the
    parameters) and how they were made."""

    fisher: Tensors  # F(x): direct, or gamma (Lambda_x - tau^-2)
    fisher_shift: Tensors | None = None  # F(x') likewise, when a shift was used
    precision: Tensors | None = None  # Lambda_x (variational only)
    precision_shift: Tensors | None = None  # Lambda_x' (variational with a shift)
    estimator: Literal["direct", "variational"] = "direct"
    labels: LabelMode = "empirical"
    images: int = 0  # images per estimate (each of x and x')
    eps_mu: float | None = None  # mean shift sizes (with a shift)
    eps_sigma: float | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the estimator's settings (gamma, tau, shift, ...)

    def delta(self, eps: float) -> Tensors:
        """The slide's Delta F on F(x), F(x') (direct) or gamma (Lambda - tau^-2) (variational)."""
        if self.fisher_shift is None:
            raise ValueError("Delta F needs an estimate made with a shift")
        return delta_fim(self.fisher, self.fisher_shift, eps)

    def drf(self, eps: float) -> Tensors:
        """DR-FIM: :func:`dr_fim` for a direct estimate, :func:`dr_fim_variational` for a variational one."""
        if self.fisher_shift is None or self.eps_mu is None or self.eps_sigma is None:
            raise ValueError("DR-FIM needs an estimate made with a shift")
        if self.estimator == "variational":
            return dr_fim_variational(self.precision, self.precision_shift, self.config["gamma"], self.config["tau"],
                                      self.eps_mu, self.eps_sigma, eps)
        return dr_fim(self.fisher, self.fisher_shift, self.eps_mu, self.eps_sigma, eps)

    def save(self, path: str | Path) -> None:
        tensors = {}
        for group in GROUPS:
            for name, t in (getattr(self, group) or {}).items():
                tensors[f"{group}/{name}"] = t.detach().cpu().contiguous()
        meta = {
            "format": FORMAT,
            "names": list(self.fisher),
            "groups": [g for g in GROUPS if getattr(self, g) is not None],
            "estimator": self.estimator,
            "labels": self.labels,
            "images": self.images,
            "eps_mu": self.eps_mu,
            "eps_sigma": self.eps_sigma,
            "config": self.config,
        }
        save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path: str | Path) -> "FisherEstimate":
        """The estimate saved at ``path``; a damaged or foreign file is a one-line :class:`UserError`."""
        fix = "delete it (or its folder) to estimate again"
        try:
            tensors, raw = load_safetensors(path)
            meta = {k: json.loads(v) for k, v in raw.items()}
        except (DamagedFile, ValueError) as e:
            raise UserError(f"{path}: a damaged Fisher estimate ({first_line(e)}); {fix}") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}: not a Fisher estimate of format {FORMAT} (metadata format "
                            f"{meta.get('format')!r}); {fix}")
        try:
            groups = {g: {n: tensors[f"{g}/{n}"] for n in meta["names"]} if g in meta["groups"] else None
                      for g in GROUPS}
            return cls(**groups, estimator=meta["estimator"], labels=meta["labels"], images=meta["images"],
                       eps_mu=meta["eps_mu"], eps_sigma=meta["eps_sigma"], config=meta["config"])
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: a damaged Fisher estimate (no {first_line(e)}); {fix}") from None


# --------------------------------------------------------------------------------------------- DR-FIM
def _pairs(a: Tensors, b: Tensors) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    if list(a) != list(b):
        raise ValueError("the two estimates cover different parameters")
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            raise ValueError(f"{name}: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
        yield name, to_compute(x), to_compute(y)


def delta_fim(f_x: Tensors, f_shift: Tensors, eps: float) -> Tensors:
    """|F(x) - F(x')| / (min(F(x), F(x')) + eps), per element."""
    return {n: (x - y).abs() / (torch.minimum(x, y) + eps) for n, x, y in _pairs(f_x, f_shift)}


def dr_fim(f_x: Tensors, f_shift: Tensors, eps_mu: float, eps_sigma: float, eps: float) -> Tensors:
    """F(x) + exp(-(eps_mu + eps_sigma)) |F(x) - F(x')| / (min(F(x), F(x')) + eps), per element."""
    w = math.exp(-(eps_mu + eps_sigma))
    return {n: x + w * (x - y).abs() / (torch.minimum(x, y) + eps) for n, x, y in _pairs(f_x, f_shift)}


def dr_fim_variational(lam_x: Tensors, lam_shift: Tensors, gamma: float, tau: float, eps_mu: float,
                       eps_sigma: float, eps: float) -> Tensors:
    """gamma (Lambda_x - tau^-2 + exp(-(eps_mu + eps_sigma)) |Lambda_x - Lambda_x'| / (min + eps / gamma))."""
    w = math.exp(-(eps_mu + eps_sigma))
    return {n: gamma * (x - tau ** -2 + w * (x - y).abs() / (torch.minimum(x, y) + eps / gamma))
            for n, x, y in _pairs(lam_x, lam_shift)}


# --------------------------------------------------------------------------------------------- helpers
def _take(batches: Iterable, images: int | None, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches on ``device``, cut so that ``images`` images are seen (None: all)."""
    seen = 0
    for x, y in batches:
        if images is not None:
            x, y = x[: images - seen], y[: images - seen]
        if x.shape[0] == 0:
            break
        yield to_compute(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)  # float64 in an fp64 cell
        seen += x.shape[0]
        if images is not None and seen >= images:
            return
    if images is not None and seen < images:
        raise RuntimeError(f"the source batches ended after {seen} of {images} images")


@contextmanager
def _estimation_mode(model: torch.nn.Module, params: Tensors):
    """Eval mode, gradients only for ``params``; restores modes and flags and clears gradients on exit."""
    chosen = {id(p) for p in params.values()}
    tensors = list({id(p): p for p in [*model.parameters(), *params.values()]}.values())
    flags = [(p, p.requires_grad) for p in tensors]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in tensors:
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        for m, mode in modes:
            m.train(mode)


def _check_params(params: Tensors) -> tuple[list[str], list[torch.Tensor]]:
    if not params:
        raise ValueError("no parameters to estimate the Fisher of")
    for name, p in params.items():
        if not p.is_floating_point():
            raise ValueError(f"{name}: not a floating-point parameter")
    return list(params), list(params.values())


def _uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _score_kind(segmentor: torch.nn.Module, scores: ScoreKind) -> str:
    if scores != "auto":
        return scores
    from fishertune.heads.mask2former import Mask2FormerHead

    head = getattr(segmentor, "head", None)
    return "probabilities" if isinstance(head, Mask2FormerHead) else "logits"


def class_probabilities(scores: torch.Tensor, kind: Literal["logits", "probabilities"]) -> torch.Tensor:
    """B x K x H x W per-pixel distribution: softmax of logits, or non-negative scores normalised."""
    s = to_compute(scores)
    if kind == "logits":
        return s.softmax(dim=1)
    s = s.clamp_min(0) + 1e-12  # a pixel without any score gets the uniform distribution
    return s / s.sum(dim=1, keepdim=True)


def sample_labels(probs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One label per pixel drawn from ``probs`` (B x K x H x W) by inverse CDF; 255 where ``labels`` is 255."""
    if probs.shape[-2:] != labels.shape[-2:]:
        probs = F.interpolate(probs, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    cdf = probs.cumsum(dim=1)
    u = _uniform(labels.shape, generator, probs.device) * cdf[:, -1]
    y = (cdf < u[:, None]).sum(dim=1).clamp_max(probs.shape[1] - 1)
    return torch.where(labels.to(y.device) == IGNORE_INDEX, torch.full_like(y, IGNORE_INDEX), y)


def _labels_for(segmentor, x: torch.Tensor, y: torch.Tensor, mode: LabelMode, kind: str, draws: int,
                generator: torch.Generator | None) -> list[torch.Tensor]:
    """``draws`` label maps for the batch: the ground truth (every draw), or sampled from f(y|x)."""
    if mode == "empirical":
        return [y.long()] * draws
    with torch.no_grad():
        probs = class_probabilities(segmentor(x), kind)
    return [sample_labels(probs, y, generator) for _ in range(draws)]


def _square_grads(segmentor, tensors: list[torch.Tensor], acc: list[torch.Tensor], x1, y1) -> None:
    loss = segmentor.loss(x1, y1)
    if not loss.requires_grad:  # no rated parameter takes part: zero gradients
        return
    for a, g in zip(acc, torch.autograd.grad(loss, tensors, allow_unused=True)):
        if g is not None:
            g = to_compute(g)
            a.addcmul_(g, g)


# --------------------------------------------------------------------------------------------- direct
def direct_fisher(segmentor: torch.nn.Module, params: Tensors, batches: Iterable, labels: LabelMode = "model",
                  shift: DomainShift | None = None, generator: torch.Generator | None = None, *,
                  images: int | None = None, label_draws: int = 1, scores: ScoreKind = "auto",
                  device: torch.device | None = None, desc: str = "fisher (direct)") -> FisherEstimate:
    """Diagonal Fisher from squared per-image gradients; see the module docstring.

    ``params``: name -> parameter of ``segmentor`` to rate. ``batches``: iterable of (images, labels);
    ``images``: stop after that many images (None: all batches). With ``shift``, F(x') is estimated on
    the same images and labels. ``generator`` drives the shift and the label draws.
    """
    if labels not in ("empirical", "model"):
        raise ValueError(f"labels must be 'empirical' or 'model', got {labels!r}")
    if label_draws < 1:
        raise ValueError(f"label_draws must be >= 1, got {label_draws}")
    names, tensors = _check_params(params)
    device = device if device is not None else tensors[0].device
    kind = _score_kind(segmentor, scores)
    acc = [torch.zeros_like(p, dtype=torch.get_default_dtype()) for p in tensors]
    acc_shift = [torch.zeros_like(p, dtype=torch.get_default_dtype()) for p in tensors] if shift is not None else None
    seen, size_mu, size_sigma = 0, 0.0, 0.0
    with _estimation_mode(segmentor, params):
        progress = bar(total=images, desc=desc, unit="img")
        for x, y in _take(batches, images, device):
            b = x.shape[0]
            x_shift = None
            if shift is not None:
                x_shift, (e_mu, e_sigma) = shift(x, generator)
                size_mu += e_mu * b
                size_sigma += e_sigma * b
            draws = _labels_for(segmentor, x, y, labels, kind, label_draws, generator)
            for n in range(b):
                for yd in draws:
                    _square_grads(segmentor, tensors, acc, x[n:n + 1], yd[n:n + 1])
                    if x_shift is not None:
                        _square_grads(segmentor, tensors, acc_shift, x_shift[n:n + 1], yd[n:n + 1])
                progress.update(1)
            seen += b
        progress.close()
    if seen == 0:
        raise RuntimeError("no images to estimate the Fisher on")
    scale = 1.0 / (seen * label_draws)
    config: dict[str, Any] = {"label_draws": label_draws, "scores": kind,
                              "shift": shift.model_dump() if shift is not None else None}
    return FisherEstimate(
        fisher={n: a.mul_(scale) for n, a in zip(names, acc)},
        fisher_shift={n: a.mul_(scale) for n, a in zip(names, acc_shift)} if acc_shift is not None else None,
        estimator="direct", labels=labels, images=seen,
        eps_mu=size_mu / seen if shift is not None else None,
        eps_sigma=size_sigma / seen if shift is not None else None,
        config=config)


# --------------------------------------------------------------------------------------------- variational
class VariationalConfig(BaseModel):
    """Settings of :func:`variational_fisher` (``variational_fisher(..., **cfg.model_dump())``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    gamma: float = Field(1e-8, gt=0, description="weight of KL(q || p) in the objective; the estimate is "
                                                 "gamma (Lambda - tau^-2), so gamma sets which Fisher values stand "
                                                 "out of the prior's precision tau^-2 (not given in the paper)")
    tau: float = Field(1e-2, gt=0, description="standard deviation of the prior N(theta_pretrained, tau^2 I); also "
                                               "the largest noise q starts with (not given in the paper)")
    steps: int = Field(200, gt=0, description="Adam steps on the objective (one batch per step, cycling)")
    samples: int = Field(1, gt=0, description="reparametrised draws of theta per step (each with its "
                                              "antithetic twin when antithetic is true)")
    lr: float = Field(0.05, gt=0, description="Adam learning rate of s = ln Lambda")
    mean_lr: float = Field(1e-5, ge=0, description="Adam learning rate of q's mean theta_hat (small: the mean "
                                                   "should stay near the pretrained weights)")
    optimise_mean: bool = Field(True, description="optimise q's mean theta_hat (the slide's q); false holds it at "
                                                  "the pretrained weights")
    init_scale: float = Field(1.0, gt=0, description="Lambda starts at init_scale * tau^-2 (1: q starts with the "
                                                      "prior's variance)")
    average_from: float = Field(0.5, ge=0, lt=1, description="Lambda is 1 / the mean of 1 / Lambda over the steps "
                                                             "from this fraction of the run on (Polyak averaging)")
    antithetic: bool = Field(True, description="pair every draw e with -e (cancels the first-order noise of "
                                               "the gradient; doubles the passes per draw)")
    curvature: Literal["sampled", "fisher"] = Field(
        "fisher", description="how the Lambda-gradient sees the loss's curvature: sampled (the reparametrisation "
                               "gradient of E_q[L], a Hutchinson-type probe of the Hessian's diagonal) or fisher "
                               "(the slide's E_q[L] ~ L + 1/2 Tr(F Lambda^-1) with F the squared per-image gradients "
                               "at the sampled weights, as variational online Gauss-Newton does)")


def _seed(generator: torch.Generator | None) -> int:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device))


def _precision(segmentor, tensors: list[torch.Tensor], data: list, *, gamma: float, tau: float, steps: int,
               samples: int, lr: float, mean_lr: float, optimise_mean: bool, init_scale: float,
               average_from: float, antithetic: bool, curvature: str, noise: torch.Generator,
               progress) -> list[torch.Tensor]:
    """Lambda (the compute dtype, shaped as the parameters) minimising E_q[L] + gamma KL(q || p); weights restored."""
    originals = [p.detach().clone() for p in tensors]
    prior = [to_compute(o) for o in originals]  # theta_pretrained
    mean = [to_compute(o).clone() for o in originals]
    start = math.log(init_scale) - 2 * math.log(tau)
    log_lam = [torch.full_like(o, start, dtype=torch.get_default_dtype()) for o in originals]
    groups = [{"params": log_lam, "lr": lr}]
    if optimise_mean:
        groups.append({"params": mean, "lr": mean_lr})
    opt = torch.optim.Adam(groups)
    avg = [torch.zeros_like(s) for s in log_lam]
    start = min(int(average_from * steps), steps - 1)
    signs = (1.0, -1.0) if antithetic else (1.0,)
    evals = samples * len(signs)
    inv_tau2 = tau ** -2
    try:
        for t in range(steps):
            x, y = data[t % len(data)]
            std = [torch.exp(-0.5 * s) for s in log_lam]
            g_mean = [torch.zeros_like(s) for s in log_lam]
            g_log = [torch.zeros_like(s) for s in log_lam]
            for _ in range(samples):
                e = [torch.randn(s.shape, generator=noise, device=s.device) for s in log_lam]
                for sign in signs:
                    with torch.no_grad():
                        for p, m, sd, ei in zip(tensors, mean, std, e):
                            p.copy_(m + sign * sd * ei)
                    if curvature == "fisher":  # per image: the mean of the gradients, the mean of their squares
                        b = x.shape[0]
                        for n in range(b):
                            loss = segmentor.loss(x[n:n + 1], y[n:n + 1])
                            if not loss.requires_grad:
                                continue
                            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                            for gm, gl, g, sd in zip(g_mean, g_log, grads, std):
                                if g is not None:
                                    g = to_compute(g)
                                    gm.add_(g, alpha=1 / b)
                                    # d/ds 1/2 F exp(-s) = -1/2 F / Lambda, F = g^2
                                    gl.addcmul_(g, g * sd * sd, value=-0.5 / b)
                        continue
                    loss = segmentor.loss(x, y)
                    if not loss.requires_grad:
                        continue
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    for gm, gl, g, sd, ei in zip(g_mean, g_log, grads, std, e):
                        if g is not None:
                            g = to_compute(g)
                            gm.add_(g)
                            gl.add_(g * ei * sd, alpha=-0.5 * sign)  # dtheta/ds = -e sqrt(1/Lambda) / 2
            with torch.no_grad():
                for m, s, gm, gl, p0 in zip(mean, log_lam, g_mean, g_log, prior):
                    # closed-form KL gradients: d/ds = (1 - exp(-s) tau^-2) / 2, d/dtheta_hat = (theta_hat - theta_0) tau^-2
                    s.grad = gl.div_(evals).add_(0.5 * gamma * (1 - torch.exp(-s) * inv_tau2))
                    m.grad = gm.div_(evals).add_((m - p0) * (gamma * inv_tau2)) if optimise_mean else None
                opt.step()
                if t >= start:
                    for a, s in zip(avg, log_lam):
                        a.add_(torch.exp(-s))
            progress.update(1)
    finally:
        with torch.no_grad():
            for p, o in zip(tensors, originals):
                p.copy_(o)
    n_avg = steps - start
    return [torch.reciprocal(a.div_(n_avg)) for a in avg]


def variational_fisher(segmentor: torch.nn.Module, params: Tensors, batches: Iterable, gamma: float, tau: float,
                       steps: int, samples: int, lr: float, *, mean_lr: float = 1e-5, optimise_mean: bool = True,
                       init_scale: float = 1.0, average_from: float = 0.5, antithetic: bool = True,
                       curvature: Literal["sampled", "fisher"] = "fisher", labels: LabelMode = "empirical",
                       shift: DomainShift | None = None,
                       generator: torch.Generator | None = None, images: int | None = None,
                       scores: ScoreKind = "auto", device: torch.device | None = None,
                       desc: str = "fisher (variational)") -> FisherEstimate:
    """Variational diagonal Fisher gamma (Lambda - tau^-2); see the module docstring.

    The batches (cut to ``images``) are materialised on ``device`` and cycled, one per step. With
    ``shift``, x' is made once per batch and a second run from the same start and noise gives
    Lambda_x'. ``labels="model"`` draws the labels once per batch from the pretrained model's f(y|x)
    (reused for x'); the default is the ground truth (L is the task loss).
    """
    if labels not in ("empirical", "model"):
        raise ValueError(f"labels must be 'empirical' or 'model', got {labels!r}")
    if curvature not in ("sampled", "fisher"):
        raise ValueError(f"curvature must be 'sampled' or 'fisher', got {curvature!r}")
    if steps < 1 or samples < 1 or gamma <= 0 or tau <= 0 or init_scale <= 0 or not 0 <= average_from < 1:
        raise ValueError("need steps, samples >= 1; gamma, tau, init_scale > 0; 0 <= average_from < 1")
    names, tensors = _check_params(params)
    device = device if device is not None else tensors[0].device
    kind = _score_kind(segmentor, scores)
    settings = dict(gamma=gamma, tau=tau, steps=steps, samples=samples, lr=lr, mean_lr=mean_lr,
                    optimise_mean=optimise_mean, init_scale=init_scale, average_from=average_from,
                    antithetic=antithetic, curvature=curvature)
    with _estimation_mode(segmentor, params):
        data, data_shift, seen, size_mu, size_sigma = [], [], 0, 0.0, 0.0
        for x, y in _take(batches, images, device):
            yl = _labels_for(segmentor, x, y, labels, kind, 1, generator)[0]
            data.append((x, yl))
            if shift is not None:
                x_shift, (e_mu, e_sigma) = shift(x, generator)
                data_shift.append((x_shift, yl))
                size_mu += e_mu * x.shape[0]
                size_sigma += e_sigma * x.shape[0]
            seen += x.shape[0]
        if seen == 0:
            raise RuntimeError("no images to estimate the Fisher on")
        seed = _seed(generator)
        progress = bar(total=steps * (2 if shift is not None else 1), desc=desc, unit="step")
        runs = [data] + ([data_shift] if shift is not None else [])
        lams = [_precision(segmentor, tensors, run, noise=torch.Generator(device=device).manual_seed(seed),
                           progress=progress, **settings) for run in runs]
        progress.close()
    lam = dict(zip(names, lams[0]))
    lam_shift = dict(zip(names, lams[1])) if shift is not None else None
    fisher = {n: gamma * (v - tau ** -2) for n, v in lam.items()}
    fisher_shift = {n: gamma * (v - tau ** -2) for n, v in lam_shift.items()} if lam_shift is not None else None
    config: dict[str, Any] = {**settings, "scores": kind, "shift": shift.model_dump() if shift is not None else None}
    return FisherEstimate(fisher=fisher, fisher_shift=fisher_shift, precision=lam, precision_shift=lam_shift,
                          estimator="variational", labels=labels, images=seen,
                          eps_mu=size_mu / seen if shift is not None else None,
                          eps_sigma=size_sigma / seen if shift is not None else None, config=config)
