"""Graph-building helpers shared by the matcher's kinds and the rewriters."""
