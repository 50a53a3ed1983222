"""Integrations with other inference engines. Each submodule imports its engine lazily (only when used), so importing
:mod:`kvpress_like` never imports them."""
