"""Per-op tests across backends (a package, so its conftest does not shadow tests/conftest.py)."""
