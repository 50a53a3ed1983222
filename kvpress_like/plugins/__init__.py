"""Plugins shipped with the package; ``builtin`` registers every built-in feature."""
