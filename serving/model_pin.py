"""Optional model pinning, shared by every endpoint: a version or a label, with TF Serving's meaning."""

from __future__ import annotations

from flask import request

from serving import errors


def read_pin() -> tuple[int | None, str | None]:
    """Optional model pinning from the query string or the JSON body: version or label."""
    body = request.get_json(silent=True) if request.mimetype == "application/json" else None
    source = body if isinstance(body, dict) else {}
    version = request.args.get("version", source.get("version"))
    label = request.args.get("label", source.get("label"))
    if version is not None and label is not None:
        raise errors.bad_request("give either 'version' or 'label', not both")
    if version is not None:
        try:
            version = int(version)
        except (TypeError, ValueError):
            raise errors.bad_request("'version' must be a positive integer") from None
        if version < 1:
            raise errors.out_of_range("'version' must be a positive integer")
    if label is not None and (not isinstance(label, str) or not label):
        raise errors.bad_request("'label' must be a non-empty string")
    return version, label
