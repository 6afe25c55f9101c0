"""Steering and interventions on the service side: resolving specs, training vectors, activation patching."""
