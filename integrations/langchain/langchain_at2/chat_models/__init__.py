"""The AT2 chat model."""

from .base import ChatAT2

__all__ = ["ChatAT2"]
