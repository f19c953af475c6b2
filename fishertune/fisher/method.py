"""FisherTune (Zhao et al., CVPR 2025): tune the backbone elements that DR-FIM rates highest.

Before training, the diagonal Fisher of the blocks' parameters is estimated on source images x and on
a domain-shifted view x' of them (:mod:`fishertune.fisher.estimate`, :mod:`fishertune.fisher.shift`),
combined into the domain-related Fisher

    DRF = F(x) + exp(-(eps_mu + eps_sigma)) |F(x) - F(x')| / (min(F(x), F(x')) + eps)

(variationally: gamma (Lambda_x - tau^-2 + exp(-(eps_mu + eps_sigma)) |Lambda_x - Lambda_x'| /
(min(Lambda_x, Lambda_x') + eps / gamma))), and the top-k elements under the budget (5% of the
backbone, 15.21M on ViT-L; :func:`~fishertune.fisher.sparse.budget_elements`) are the only backbone
elements that train, through :class:`~fishertune.fisher.sparse.SparseAdamW` (optimizer state for them
alone). The decode head trains densely. The selector is a config field, so the paper's ablation rows
(random, random within q / k / v, FIM, delta-FIM, DR-FIM) are this method with another ``selector``,
at the same budget.

Choices the paper leaves open (each a config field):
- the estimate is made before any training, with the decode head as initialised (as ChildTuning
  rates a pretrained model with a fresh task head), on ``images`` source images of the run's augmented
  training stream, served in the training batches joined to at least 2 images each (the domain shift
  measures channel statistics over a batch; a training batch of 1, as each process of a 4-GPU DDP run of
  batch 4 has, is joined with the next: :func:`batches_of_at_least`), hence ``images`` >= 2;
- ``eps`` is relative: the absolute epsilon is ``eps`` times the mean of the denominator's min term
  over the rated elements (min(F(x), F(x')) directly, gamma min(Lambda_x, Lambda_x') variationally),
  so that its effect does not depend on the loss's scale;
- the variational estimate's curvature is the Fisher at sampled weights (``variational.curvature:
  fisher``, variational online Gauss-Newton), the slide's E_q[L] ~ L + 1/2 Tr(F Lambda^-1) taken
  literally; the reparametrisation gradient of E_q[L] itself (``curvature: sampled``) is a Hutchinson
  probe whose off-diagonal noise made the mask a random one on the miniature (see
  :mod:`fishertune.fisher.estimate`);
- the two terms of DR-FIM are added as the slide writes them, although they have different units: the
  Fisher term carries the loss's scale, the domain term is a ratio (times gamma, variationally). Their
  balance therefore rests on gamma and the loss's scale, which the paper does not give. On the miniature,
  with the variational estimate at gamma 1e-8, the domain term is five to six orders of magnitude below
  the Fisher term (the mini ablation's cached estimates) and the DR-FIM mask is the FIM mask, element for
  element (the mini estimation table's fim-variational and dr_fim-variational rows are identical); with
  the direct estimate the ratio is not scaled by gamma, and its DR-FIM mask shared 17-32% of its elements
  with FIM's (the mini estimation's cached masks);
- random selectors draw from a generator seeded with the manifest's seed (or ``selection_seed``);
- the mask is fixed for the run by default; ``schedule: growing`` starts with the highest-rated
  ``start_fraction`` of it and adds the next-rated elements in ``growth_stages`` equal steps until the
  whole mask trains at ``growth_end`` of the run (the optimizer keeps the moments of elements already
  training; see ``SparseAdamW.grow``).

Caching. Estimates depend on the model (backbone, its weights file, the head's initialisation: seed
and config), the source data and its augmentation, and the estimator's settings, not on the selector,
budget or eps; they are computed once per such key and stored under ``<cache>/fisher/`` as
safetensors (loaded without running code), with ``info.json`` saying what the key holds. Masks are
stored beside them per selector, budget, eps and seed, with a heat map of where the selected elements
are (``selection-*.png``, the paper's layer-wise figure).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import save_file

from fishertune.errors import UserError
from fishertune.fisher.estimate import FisherEstimate, VariationalConfig, direct_fisher, variational_fisher
from fishertune.fisher.select import RANDOM_WITHIN, SELECTORS, select
from fishertune.fisher.shift import DomainShift
from fishertune.fisher.sparse import block_parameters, budget_elements
from fishertune.runner.store import atomic_write
from fishertune.tensorfile import DamagedFile, load_safetensors
from fishertune.tuning import MethodConfig, MethodContext, TuningMethod, register_method

#: bump when an estimate computed with the same key would come out differently
ESTIMATE_VERSION = 2  # 2: SAM attention through SDPA by default
RANDOM_SELECTORS = ("random", *RANDOM_WITHIN)
BUDGET_FIELD = "method 'fishertune' config field 'budget'"

Selector = Literal["random", "random_q", "random_k", "random_v", "fim", "delta_fim", "dr_fim"]
assert set(Selector.__args__) == set(SELECTORS)  # the config's choices are the selectors select() knows


class FisherTuneConfig(MethodConfig):
    budget: float = Field(0.05, gt=0, le=1, description="fraction of the backbone's parameters that train, chosen "
                                                        "among its blocks' elements (0.05 gives the paper's 15.21M "
                                                        "on ViT-L)")
    selector: Selector = Field("dr_fim", description="how the elements are chosen: dr_fim (FisherTune), fim, "
                                                     "delta_fim, or at random (random, random_q, random_k, random_v: "
                                                     "within the query / key / value projections); the paper's "
                                                     "ablation rows")
    estimator: Literal["direct", "variational"] = Field(
        "variational", description="direct: squared per-image gradients; variational: gamma (Lambda - tau^-2) of "
                                   "q(theta) = N(theta_hat, Lambda^-1) under the prior N(theta_pretrained, tau^2 I) "
                                   "(FisherTune's stable estimate)")
    labels: Literal["model", "empirical"] = Field(
        "model", description="labels of the Fisher: drawn from the model's prediction (the definition "
                             "E_{y ~ f(y|x)}) or the ground truth (empirical Fisher)")
    images: int = Field(512, ge=2, description="source images the estimate uses (not given in the paper); at "
                                               "least 2, as the domain shift measures statistics over a batch")
    eps: float = Field(0.1, gt=0, description="DR-FIM's epsilon, relative to the mean of min(F(x), F(x')) over the "
                                              "rated elements (the paper's value is not given)")
    shift: DomainShift = Field(default_factory=DomainShift, description="how x' is made from x (DESIGN section 5)")
    variational: VariationalConfig = Field(default_factory=VariationalConfig,
                                           description="settings of the variational estimate")
    selection_seed: int | None = Field(None, ge=0, le=2**63 - 1,
                                       description="seed of the random selectors; null: the manifest's seed")
    schedule: Literal["fixed", "growing"] = Field(
        "fixed", description="fixed: the whole mask trains from the start (default); growing: the highest-rated "
                             "start_fraction of it first, then more in growth_stages equal steps until all of it "
                             "trains at growth_end of the run (score selectors only)")
    start_fraction: float = Field(0.25, gt=0, le=1, description="growing: share of the mask that trains at first")
    growth_end: float = Field(0.5, gt=0, le=1, description="growing: fraction of the run by which the whole mask trains")
    growth_stages: int = Field(3, gt=0, description="growing: number of growth steps after the start")
    cache: bool = Field(True, description="keep estimates and masks under <cache>/fisher/ (FISHERTUNE_CACHE)")


def batches_of_at_least(batches: Iterable, minimum: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of at least ``minimum`` images: a smaller batch is joined with the next,
    and a remainder at the end with the batch before it. The estimate's domain shift measures the spread of
    channel statistics over a batch, and the estimate takes the training batch, which can be 1 (a 4-GPU DDP
    run of batch 4 gives each process one image; the full-size smoke trains at batch 1). Batches already
    that large pass unchanged, so the estimates of such runs are the same as before."""
    pending, xs, ys, n = None, [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if n >= minimum:
            if pending is not None:
                yield pending
            pending = (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
            xs, ys, n = [], [], 0
    if xs:
        rest = (torch.cat(xs), torch.cat(ys))
        pending = rest if pending is None else (torch.cat([pending[0], rest[0]]), torch.cat([pending[1], rest[1]]))
    if pending is not None:
        yield pending


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def absolute_eps(estimate: FisherEstimate, relative: float) -> float:
    """The absolute epsilon DR-FIM adds to its denominator (see the module docstring)."""
    if estimate.fisher_shift is None:
        return relative
    if estimate.estimator == "variational":
        a, b, scale = estimate.precision, estimate.precision_shift, float(estimate.config["gamma"])
    else:
        a, b, scale = estimate.fisher, estimate.fisher_shift, 1.0
    total = sum(float(torch.minimum(a[n], b[n]).double().sum()) for n in a)
    count = sum(a[n].numel() for n in a)
    return relative * scale * total / max(count, 1)


def read_mask(path: Path, params: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """A cached mask, checked against the parameters it selects from: every candidate named, sorted and unique
    int64 indices inside each parameter, ``k`` in all. Anything else is a one-line :class:`UserError`."""
    try:
        mask, _ = load_safetensors(path)
    except DamagedFile as e:
        raise UserError(f"{path}: a damaged mask ({e}); delete it to select again") from None
    problem = None
    if set(mask) != set(params):
        other = sorted(set(mask) ^ set(params))[0]
        problem = f"it does not name the backbone's block parameters (e.g. {other!r})"
    else:
        for name, idx in mask.items():
            n = params[name].numel()
            if (idx.dtype != torch.int64 or idx.ndim != 1 or
                    (idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all())))):
                problem = f"{name}: its indices are not sorted, unique int64 in [0, {n})"
                break
        else:
            total = sum(t.numel() for t in mask.values())
            problem = f"it selects {total:,} elements, not {k:,}" if total != k else None
    if problem:
        raise UserError(f"{path}: a damaged mask ({problem}); delete it to select again")
    return mask


@register_method
class FisherTune(TuningMethod):
    """FisherTune; see the module docstring."""

    name = "fishertune"
    paper = "https://openaccess.thecvf.com/content/CVPR2025/html/Zhao_FisherTune_Fisher-Guided_Robust_Tuning_of_Vision_Foundation_Models_for_Domain_CVPR_2025_paper.html"
    Config = FisherTuneConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.mask: dict[str, torch.Tensor] | None = None
        self.paths: dict[str, Path] = {}  # what the last before_training read or wrote
        self.stages: list[dict[str, torch.Tensor]] = []  # growing: the nested masks, smallest first

    # -------------------------------------------------------------- the method's hooks
    def apply(self, segmentor, ctx) -> None:
        backbone = segmentor.backbone
        budget_elements(backbone, self.cfg.budget, BUDGET_FIELD)  # an impossible budget fails before any data
        if self.cfg.schedule == "growing" and self.cfg.selector in RANDOM_SELECTORS:
            raise UserError(f"method 'fishertune': schedule growing needs a score selector (fim, delta_fim, "
                            f"dr_fim), not {self.cfg.selector!r}; set schedule: fixed")
        backbone.requires_grad_(False)
        for p in block_parameters(backbone).values():  # gradients flow; only the mask's elements update
            p.requires_grad_(True)

    def before_training(self, segmentor, ctx: MethodContext) -> None:
        cfg: FisherTuneConfig = self.cfg
        backbone = segmentor.backbone
        k = budget_elements(backbone, cfg.budget, BUDGET_FIELD)
        if cfg.schedule == "growing":
            self._growing(segmentor, ctx, k)
            return
        seed = cfg.selection_seed if cfg.selection_seed is not None else ctx.seed
        folder = self._folder(ctx)
        mask_key = _digest({"selector": cfg.selector, "budget": cfg.budget, "k": k, "eps": cfg.eps,
                            "seed": seed if cfg.selector in RANDOM_SELECTORS else None})
        mask_path = folder / f"mask-{cfg.selector}-{mask_key}.safetensors" if folder else None
        self.paths = {}
        if mask_path is not None and mask_path.exists():
            self.mask = read_mask(mask_path, block_parameters(backbone), k)
            self.paths["mask"] = mask_path
            return
        estimate, eps = None, cfg.eps
        if cfg.selector not in RANDOM_SELECTORS:
            estimate = self.estimate(segmentor, ctx)
            eps = absolute_eps(estimate, cfg.eps)
        generator = torch.Generator().manual_seed(seed)
        self.mask = select(cfg.selector, backbone, k, estimate=estimate, eps=eps, generator=generator)
        if mask_path is not None:
            atomic_write(mask_path, lambda p: save_file({n: t.contiguous() for n, t in self.mask.items()}, str(p)))
            self.paths["mask"] = mask_path
            self.paths["plot"] = self.plot(backbone, mask_path.with_name(f"selection-{cfg.selector}-{mask_key}.png"))

    def _growing(self, segmentor, ctx: MethodContext, k: int) -> None:
        """Nested masks: the top ``k_j`` elements by the selector's score, k_0 = start_fraction k ... k."""
        cfg: FisherTuneConfig = self.cfg
        estimate = self.estimate(segmentor, ctx)
        eps = absolute_eps(estimate, cfg.eps)
        sizes = [round(k * (cfg.start_fraction + (1 - cfg.start_fraction) * j / cfg.growth_stages))
                 for j in range(cfg.growth_stages + 1)]
        self.stages = [select(cfg.selector, segmentor.backbone, size, estimate=estimate, eps=eps) for size in sizes]
        self.mask = self.stages[0]

    def sparse_indices(self, segmentor) -> dict[str, torch.Tensor]:
        if self.mask is None:
            raise RuntimeError("fishertune: sparse_indices before before_training (the mask is chosen there)")
        return self.mask

    def sparse_growth(self, segmentor, iteration: int, iterations: int) -> dict[str, torch.Tensor] | None:
        """Growing: the next stage's mask at iterations round(growth_end * iterations * j / stages)."""
        cfg: FisherTuneConfig = self.cfg
        for j in reversed(range(1, len(self.stages))):  # the largest stage due now (short runs skip some)
            if iteration == max(1, round(cfg.growth_end * iterations * j / cfg.growth_stages)):
                self.mask = self.stages[j]
                return self.mask
        return None

    def trainable_backbone_params(self, segmentor) -> int:
        return budget_elements(segmentor.backbone, self.cfg.budget, BUDGET_FIELD)

    # -------------------------------------------------------------- estimation and cache
    def estimation_key(self, ctx: MethodContext) -> dict[str, Any]:
        """Everything an estimate depends on: the model and data identity, and the estimator's settings."""
        cfg: FisherTuneConfig = self.cfg
        settings = {"estimator": cfg.estimator, "labels": cfg.labels, "images": cfg.images,
                    "shift": cfg.shift.model_dump(mode="json")}
        if cfg.estimator == "variational":
            settings["variational"] = cfg.variational.model_dump(mode="json")
        # on the CPU the thread count changes the estimate's last bits (and a tiny model's training from it)
        threads = torch.get_num_threads() if ctx.device.type == "cpu" else None
        return {"version": ESTIMATE_VERSION, "identity": ctx.identity, "settings": settings, "cpu_threads": threads}

    def _folder(self, ctx: MethodContext) -> Path | None:
        if not self.cfg.cache or ctx.cache_dir is None or not ctx.identity:
            return None
        key = self.estimation_key(ctx)
        name = f"{ctx.identity.get('backbone', 'model')}-{ctx.identity.get('source', 'data')}-{_digest(key)}"
        return Path(ctx.cache_dir) / "fisher" / name

    def estimate(self, segmentor, ctx: MethodContext) -> FisherEstimate:
        """The estimate on x and x' (from the cache when there)."""
        cfg: FisherTuneConfig = self.cfg
        folder = self._folder(ctx)
        path = folder / "estimate.safetensors" if folder else None
        if path is not None and path.exists():
            self.paths["estimate"] = path
            return FisherEstimate.load(path)
        if ctx.source_batches is None:
            raise RuntimeError("fishertune: the MethodContext has no source_batches; the estimate needs source data")
        params = block_parameters(segmentor.backbone)
        generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        # at most `images` batches, joined to at least 2 images each; the estimator stops at `images`
        batches = batches_of_at_least(ctx.source_batches(cfg.images), 2)
        if cfg.estimator == "direct":
            est = direct_fisher(segmentor, params, batches, labels=cfg.labels, shift=cfg.shift, generator=generator,
                                images=cfg.images, device=ctx.device)
        else:
            est = variational_fisher(segmentor, params, batches, labels=cfg.labels, shift=cfg.shift,
                                     generator=generator, images=cfg.images, device=ctx.device,
                                     **cfg.variational.model_dump())
        if path is not None:
            atomic_write(path, est.save)
            info = json.dumps(self.estimation_key(ctx), indent=2, sort_keys=True, default=str)
            atomic_write(folder / "info.json", lambda p: p.write_text(info + "\n"))
            self.paths["estimate"] = path
        return est

    def plot(self, backbone, path: Path) -> Path:
        """Heat map of the selected fraction per block and matrix (the paper's layer-wise figure)."""
        from fishertune.fisher.plot import plot_selection, selection_fractions

        fractions = selection_fractions(backbone, self.mask)
        k = sum(t.numel() for t in self.mask.values())
        plot_selection(fractions, path, f"{self.cfg.selector}: {k:,} selected elements ({self.cfg.budget:.0%})")
        return path
