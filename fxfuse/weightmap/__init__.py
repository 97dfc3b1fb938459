"""The exact map between a looped model's state_dict and the fused one (no CLI wording)."""
from .entry import FORMAT, MAX_DIM, MAX_ENTRIES, OPS, WeightEntry
from .map import WeightMap

__all__ = ["FORMAT", "MAX_DIM", "MAX_ENTRIES", "OPS", "WeightEntry", "WeightMap"]
