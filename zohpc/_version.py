"""The package version, in a module of its own so that any module can name it without
importing the package ``__init__`` (no upward import)."""

__version__ = "0.1.0"
