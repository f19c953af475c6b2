"""eva02 family (being written)."""
