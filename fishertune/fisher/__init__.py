"""Fisher estimators, DR-FIM, selectors and sparse updates (DESIGN section 5)."""

from fishertune.fisher.sparse import SparseAdamW, block_parameters, budget_elements, state_bytes, topk_mask

__all__ = ["SparseAdamW", "block_parameters", "budget_elements", "state_bytes", "topk_mask"]
