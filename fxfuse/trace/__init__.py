"""Tracing: a model to a GraphModule with shapes on every node."""
