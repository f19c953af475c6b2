"""Rein's link from per-layer tokens to the Mask2Former queries, shared by Rein and VQT.

Rein (``rein/models/backbones/reins.py`` ``Reins.return_auto`` and ``rein/models/heads/rein_mask2former.py``,
run with ``link_token_to_query=True``, ``replace_query_feat=True``): the tokens of all L layers,
``(L, T, C)``, are projected to the head's width by ``transform`` (C -> Q), pooled over the layers three
ways (max, mean, and the last layer's), and ``merge`` (3Q -> Q) makes the ``T`` query embeddings. The
head drops its own ``query_embed`` and ``query_feat``: the merged embeddings are the queries'
positional part, and ``querys2feat`` (Q -> Q) makes their initial content from them.

``transform`` and ``merge`` belong to the method (in Rein, to the ``Reins`` module of the backbone, so
they count on the backbone side: 262,400 + 196,864 on ViT-L with Q = 256); ``querys2feat`` belongs to
the head (:class:`QueryLink`, installed as the head's ``query_provider``). VQT uses the same link on its
query outputs, which differ per image, so its embeddings are ``(B, T, Q)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fishertune.errors import UserError


class LayerMerge(nn.Module):
    """``(..., L, T, C)`` per-layer tokens -> ``(..., T, Q)`` query embeddings (Rein's transform + merge)."""

    def __init__(self, dim: int, query_dim: int, device=None, dtype=None):
        super().__init__()
        self.transform = nn.Linear(dim, query_dim, device=device, dtype=dtype)
        self.merge = nn.Linear(3 * query_dim, query_dim, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.transform(tokens)  # (..., L, T, Q)
        pooled = torch.stack([t.amax(dim=-3), t.mean(dim=-3), t[..., -1, :, :]], dim=-1)  # (..., T, Q, 3)
        return self.merge(pooled.flatten(-2))  # Rein's order: [max, mean, last] of each channel side by side


class QueryLink(nn.Module):
    """The head's ``query_provider``: ``source(batch)`` gives the query embeddings, ``querys2feat`` the content.

    ``source`` is held as a plain attribute, not a submodule, so the method's parameters are not
    counted (or saved) twice.
    """

    def __init__(self, source: Callable[[int], torch.Tensor], channels: int, device=None, dtype=None):
        super().__init__()
        self.querys2feat = nn.Linear(channels, channels, device=device, dtype=dtype)
        object.__setattr__(self, "source", source)

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        embed = self.source(batch_size)
        if embed.dim() == 2:
            embed = embed.unsqueeze(0).expand(batch_size, -1, -1)
        return self.querys2feat(embed), embed


def query_hook(head: nn.Module, method: str, tokens: int | None) -> tuple[int, int]:
    """Check that ``head`` takes a query provider; return (number of tokens, query width).

    ``tokens`` ``None`` means one token per query of the head; any other number must equal it.
    """
    if not hasattr(head, "query_provider") or not hasattr(head, "num_queries"):
        raise UserError(f"method {method!r} links its tokens to the decode head's queries, but head "
                        f"{type(head).__name__} has no query hook; use head mask2former (or mask2former-tiny)")
    if tokens is not None and tokens != head.num_queries:
        raise UserError(f"method {method!r}: tokens {tokens} must equal the head's num_queries "
                        f"{head.num_queries} (one token per query, as Rein); change one of them")
    return head.num_queries, head.channels


def link_queries(head: nn.Module, source: Callable[[int], torch.Tensor]) -> None:
    """Replace the head's own queries by ``source``'s (Rein's ``replace_query_feat=True``)."""
    ref = head.post_norm.weight
    for name in ("query_feat", "query_embed"):
        if name in head._modules:
            delattr(head, name)
    head.query_provider = QueryLink(source, head.channels, device=ref.device, dtype=ref.dtype)
