"""Serving: the embedded model server and the Flask gateway in front of a model server."""
