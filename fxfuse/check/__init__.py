"""Checking: verification, timing, the auto lowering choice and the report."""
