"""mae family (being written)."""
