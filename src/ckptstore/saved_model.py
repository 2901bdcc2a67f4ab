"""Placeholder: being written (save, load, Exporter)."""
