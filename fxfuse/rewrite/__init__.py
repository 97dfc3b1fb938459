"""Rewriting: replace one site with stock fused ops, and the weight map."""
