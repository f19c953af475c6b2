"""sam family (being written)."""
