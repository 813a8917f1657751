"""Alerts: the per-stream lifecycle (open, update, resolve), evidence, persistence."""
