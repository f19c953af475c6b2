"""clip family (being written)."""
