"""Optional model pinning, shared by every endpoint: a version or a label, with TF Serving's meaning."""

from __future__ import annotations

from flask import request

from serving.gateway import errors

MAX_VERSION = 2**63 - 1  # TF Serving versions are int64


def read_pin() -> tuple[int | None, str | None]:
    """Optional model pinning from the query string or the JSON body: version or label."""
    if not request.query_string and request.mimetype != "application/json":
        return None, None  # nothing to read: skip parsing the query string on the hot path
    body = request.get_json(silent=True) if request.mimetype == "application/json" else None
    source = body if isinstance(body, dict) else {}
    version = request.args.get("version", source.get("version"))
    label = request.args.get("label", source.get("label"))
    if version is not None and label is not None:
        raise errors.bad_request("give either 'version' or 'label', not both")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, (int, str)):
            raise errors.bad_request("'version' must be a positive integer")
        try:
            version = int(version)
        except ValueError:
            raise errors.bad_request("'version' must be a positive integer") from None
        if not 1 <= version <= MAX_VERSION:
            raise errors.out_of_range(f"'version' must be between 1 and {MAX_VERSION}")
    if label is not None and (not isinstance(label, str) or not label):
        raise errors.bad_request("'label' must be a non-empty string")
    if label is not None:
        errors.check_unicode(label, "label")
    return version, label
