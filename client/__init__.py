"""A small Python client for the Scribe gateway's HTTP API."""

from client.scribe_client import ScribeClient, ScribeError

__all__ = ["ScribeClient", "ScribeError"]
