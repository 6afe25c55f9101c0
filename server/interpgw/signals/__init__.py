"""Hallucination-detection signals: token signals, probes, monitors, sequence scores."""
