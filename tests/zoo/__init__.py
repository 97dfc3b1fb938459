"""Test models, by theme."""
