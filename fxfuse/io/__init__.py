"""Files: loading models and checkpoints, writing outputs."""
