"""Activation-trace cache: content-addressed entries, their self-checking byte form, and the backends that keep them."""
