"""The version of llama-index-postprocessor-at2, in one place: pyproject.toml reads it from here (hatch)."""

__version__ = "0.1.0"
