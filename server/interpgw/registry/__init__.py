"""Steering-vector registry: records, their serialization, and the stores that keep them."""
