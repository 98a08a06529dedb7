"""Callback handlers that attribute existing chains' answers to their retrieved documents."""

from .handler import EVENT_NAME, AsyncAT2CallbackHandler, AT2CallbackHandler, ChainAttribution

__all__ = ["EVENT_NAME", "AT2CallbackHandler", "AsyncAT2CallbackHandler", "ChainAttribution"]
