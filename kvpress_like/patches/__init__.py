"""One module per architecture family; each exposes ``ARCHITECTURE``, registered by the built-in plugin."""
