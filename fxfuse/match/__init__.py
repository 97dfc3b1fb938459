"""Matching: find the per-row loop sites in a traced graph (pure, read-only)."""
