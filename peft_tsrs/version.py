"""The package version (single source; pyproject reads it)."""

__version__ = "0.2.0"
