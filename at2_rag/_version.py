"""The version of at2-rag, in one place: pyproject.toml reads it from here (setuptools dynamic version)."""

__version__ = "0.1.0"
