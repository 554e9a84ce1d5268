"""The version of kho (one place; the package and the CLI read it from here)."""

__version__ = "0.1.0"
