"""Scoring methods: one module per method, each a press registered by the built-in plugin."""
