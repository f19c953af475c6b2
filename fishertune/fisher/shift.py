"""Domain-shifted views x' of a batch of normalised images for DR-FIM (DESIGN section 5).

DR-FIM compares the Fisher on x with the Fisher on a domain-shifted view x' of the same images with
the same labels, weighted by exp(-(eps_mu + eps_sigma)) where eps_mu and eps_sigma are the sizes of
the shift. The paper's body is not available; these are our shifts, all on the *normalised* image
tensor (B x C x H x W, the segmentor's input), labels untouched:

``style`` (default; DSU, Li et al., ICLR 2022, "Uncertainty Modeling for Out-of-Distribution
Generalization", applied to the image as its ``DistributionUncertainty`` module applies it to a
feature map, with its eps = 1e-6 and unbiased variances):

    mu_bc = mean_hw x_bc,  sigma_bc = sqrt(var_hw x_bc + 1e-6)
    Sigma_mu_c = sqrt(var_b mu_bc + 1e-6),  Sigma_sigma_c = sqrt(var_b sigma_bc + 1e-6)
    mu'_bc = mu_bc + e_mu_bc Sigma_mu_c,  sigma'_bc = sigma_bc + e_sigma_bc Sigma_sigma_c,  e ~ N(0, 1)
    x'_bc = (x_bc - mu_bc) / sigma_bc * sigma'_bc + mu'_bc

  drawn as DSU draws them: first e_mu (shape B x C), then e_sigma, from the generator. One deviation
  from DSU: sigma' is floored at 0.01 sigma (DSU lets a large negative draw flip the channel's sign,
  which is no longer a change of style).

``photometric``: per image (the same for every channel), contrast c ~ U[1 - contrast, 1 + contrast]
about each channel's mean, then brightness b ~ U[-brightness, brightness] added, both in normalised
units (a brightness of 0.5 is half a dataset standard deviation):

    x'_bc = (x_bc - mu_bc) c_b + mu_bc + b_b,   so   mu(x')_bc = mu_bc + b_b,  std(x')_bc = c_b std(x_bc)

  drawn in that order (c of shape B, then b of shape B).

``fourier`` (FDA, Yang & Soatto, CVPR 2020, "Fourier Domain Adaptation"): the amplitude of each
image's low frequencies is mixed with that of another image of the batch (image b takes image
(b + r) mod B, r drawn uniformly from 1..B-1, so never itself), the phase kept:

    A'_b = (1 - mix) A_b + mix A_{b+r}   on the window |k_y| <= n, 0 <= k_x <= n,  n = floor(beta min(H, W))
    x'_b = irfft2(A'_b exp(i phase_b))

  with ``mix`` = 1 FDA's replacement. FDA's window is rows 0..n-1 and H-n..H-1; ours adds row n so
  that the window is symmetric (|k_y| <= n) and the mixed half spectrum stays the spectrum of a real
  image, which keeps the phase exactly. beta < 0.5.

Sizes. Every shift returns ``(x', (eps_mu, eps_sigma))``, measured the same way for every shift:

    eps_mu = mean_bc |mu(x')_bc - mu(x)_bc| / (Sigma_mu_c + 1e-6),  eps_sigma likewise with sigma

with Sigma the batch spread of x (above), i.e. how many batch standard deviations the channel
statistics moved. For ``style`` this is the mean |N(0, 1) draw|, the size of the shifts drawn (up to
the 1e-6 terms and the sigma floor).

Batches of one: the batch spread is undefined, so a shift needs at least two images unless the
spread is passed in (``reference=batch_spread(reference_batch)``); ``fourier`` always needs another
image, so at least two. Anything else is a :class:`~fishertune.errors.UserError` naming the fix.

Determinism: all draws come from the ``generator`` passed in (on its device, then moved to the
images' device), so the same generator state gives the same x' on every device; without one,
torch's global CPU generator is used.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fishertune.errors import UserError
from fishertune.precision import to_compute

EPS = 1e-6  # DSU's eps, in the standard deviations and in the size measure
SIGMA_FLOOR = 0.01  # sigma' >= SIGMA_FLOOR * sigma in the style shift

Sizes = tuple[float, float]


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image per-channel mean and std (B x C), DSU's: std = sqrt(unbiased var over H x W + 1e-6)."""
    x = to_compute(images)
    return x.mean(dim=(2, 3)), (x.var(dim=(2, 3)) + EPS).sqrt()


def batch_spread(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Sigma_mu, Sigma_sigma), each of shape C: the std over the batch of the channel means and stds."""
    _check_batch(images, None, "the batch spread")
    mu, sigma = channel_stats(images)
    return (mu.var(dim=0) + EPS).sqrt(), (sigma.var(dim=0) + EPS).sqrt()


def _check_batch(images: torch.Tensor, reference, what: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images B x C x H x W, got shape {tuple(images.shape)}")
    if images.shape[0] < 2 and reference is None:
        raise UserError(f"{what} needs a batch of at least 2 images to measure the spread of the channel "
                        f"statistics over the batch (got {images.shape[0]}); give the estimate at least 2 images "
                        f"(FisherTune's images joins smaller training batches to 2)")


def _spread(images: torch.Tensor, reference) -> tuple[torch.Tensor, torch.Tensor]:
    if reference is None:
        return batch_spread(images)
    s_mu, s_sigma = reference
    dtype = torch.get_default_dtype()
    return s_mu.to(images.device, dtype), s_sigma.to(images.device, dtype)


def _draw(kind: str, shape, generator: torch.Generator | None, device: torch.device, **kw) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if kind == "randn":
        out = torch.randn(shape, generator=generator, device=gen_device)
    elif kind == "rand":
        out = torch.rand(shape, generator=generator, device=gen_device)
    else:  # "randint"
        out = torch.randint(kw["low"], kw["high"], shape, generator=generator, device=gen_device)
    return out.to(device)


def shift_sizes(images: torch.Tensor, shifted: torch.Tensor, reference=None) -> Sizes:
    """(eps_mu, eps_sigma): mean over images and channels of |stat(x') - stat(x)| / (Sigma_stat + 1e-6)."""
    s_mu, s_sigma = _spread(images, reference)
    mu, sigma = channel_stats(images)
    mu2, sigma2 = channel_stats(shifted)
    eps_mu = ((mu2 - mu).abs() / (s_mu + EPS)).mean()
    eps_sigma = ((sigma2 - sigma).abs() / (s_sigma + EPS)).mean()
    return float(eps_mu), float(eps_sigma)


def style_shift(images: torch.Tensor, generator: torch.Generator | None = None,
                reference=None) -> tuple[torch.Tensor, Sizes]:
    """DSU's style shift of the channel statistics; see the module docstring."""
    _check_batch(images, reference, "the style shift")
    s_mu, s_sigma = _spread(images, reference)
    mu, sigma = channel_stats(images)
    b, c = mu.shape
    e_mu = _draw("randn", (b, c), generator, images.device)
    e_sigma = _draw("randn", (b, c), generator, images.device)
    mu2 = mu + e_mu * s_mu
    sigma2 = torch.maximum(sigma + e_sigma * s_sigma, SIGMA_FLOOR * sigma)
    x = to_compute(images)
    out = (x - mu[..., None, None]) / sigma[..., None, None] * sigma2[..., None, None] + mu2[..., None, None]
    out = out.to(images.dtype)
    return out, shift_sizes(images, out, reference)


def photometric_shift(images: torch.Tensor, brightness: float, contrast: float,
                      generator: torch.Generator | None = None, reference=None) -> tuple[torch.Tensor, Sizes]:
    """Per-image contrast about each channel's mean, then brightness, in normalised units."""
    _check_batch(images, reference, "the photometric shift")
    mu, _ = channel_stats(images)
    b = images.shape[0]
    c = 1 + contrast * (2 * _draw("rand", (b,), generator, images.device) - 1)
    add = brightness * (2 * _draw("rand", (b,), generator, images.device) - 1)
    x = to_compute(images)
    m = mu[..., None, None]
    out = ((x - m) * c[:, None, None, None] + m + add[:, None, None, None]).to(images.dtype)
    return out, shift_sizes(images, out, reference)


def fourier_shift(images: torch.Tensor, beta: float, mix: float = 1.0, generator: torch.Generator | None = None,
                  reference=None) -> tuple[torch.Tensor, Sizes]:
    """FDA-style low-frequency amplitude mix with another image of the batch, phase kept."""
    if images.ndim == 4 and images.shape[0] < 2:
        raise UserError(f"the fourier shift mixes each image with another image of its batch and needs a batch of "
                        f"at least 2 images (got {images.shape[0]}); give the estimate at least 2 images "
                        f"(FisherTune's images joins smaller training batches to 2)")
    _check_batch(images, reference, "the fourier shift")
    if not 0 < beta < 0.5:
        raise ValueError(f"beta must be in (0, 0.5), got {beta}")
    bsz, _, h, w = images.shape
    n = int(math.floor(min(h, w) * beta))
    r = int(_draw("randint", (1,), generator, torch.device("cpu"), low=1, high=bsz))
    x = to_compute(images)
    spec = torch.fft.rfft2(x)
    amp, phase = spec.abs(), spec.angle()
    other = amp.roll(-r, dims=0)  # other[b] = amp[(b + r) mod B]
    rows = torch.zeros(h, dtype=torch.bool, device=x.device)
    rows[: n + 1] = True
    if n > 0:
        rows[h - n:] = True
    cols = torch.zeros(spec.shape[-1], dtype=torch.bool, device=x.device)
    cols[: n + 1] = True
    window = (rows[:, None] & cols[None, :]).to(x.dtype)
    amp2 = amp + mix * window * (other - amp)
    out = torch.fft.irfft2(torch.polar(amp2, phase), s=(h, w)).to(images.dtype)
    return out, shift_sizes(images, out, reference)


class DomainShift(BaseModel):
    """Which shift makes x' and its strength; call it as ``shift(images, generator) -> (x', sizes)``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    kind: Literal["style", "photometric", "fourier"] = Field(
        "style", description="style: DSU's N(0,1) x batch-spread shift of the per-channel mean and std (default); "
                             "photometric: brightness/contrast jitter; fourier: FDA low-frequency amplitude mix")
    brightness: float = Field(0.5, ge=0, description="photometric: brightness offset drawn from U[-b, b], in "
                                                     "normalised units (dataset standard deviations)")
    contrast: float = Field(0.5, ge=0, lt=1, description="photometric: contrast factor drawn from "
                                                         "U[1 - c, 1 + c], about each channel's mean")
    beta: float = Field(0.01, gt=0, lt=0.5, description="fourier: low-frequency window half-size as a fraction of "
                                                        "min(H, W) (FDA's beta; 0.01 is FDA's best single value)")
    mix: float = Field(1.0, gt=0, le=1, description="fourier: weight of the other image's amplitude in the window "
                                                    "(1 = FDA's replacement)")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 reference=None) -> tuple[torch.Tensor, Sizes]:
        if self.kind == "style":
            return style_shift(images, generator, reference)
        if self.kind == "photometric":
            return photometric_shift(images, self.brightness, self.contrast, generator, reference)
        return fourier_shift(images, self.beta, self.mix, generator, reference)
