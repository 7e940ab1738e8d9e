"""Optional model pinning, shared by every endpoint: a version or a label, with TF Serving's meaning;
and the choice of a digits model among the rungs of the ladder."""

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


def read_model(ladder: dict[str, str]) -> str | None:
    """The digits model a request names with `model` (query string, JSON body or multipart form
    field): a rung of `ladder` (bn, conv-dropout, ...) or the model it is served as; None when
    it names none. An unknown one is a 404 that lists the known ones."""
    body = request.get_json(silent=True) if request.mimetype == "application/json" else None
    value = request.args.get("model")
    if value is None and isinstance(body, dict):
        value = body.get("model")
    if value is None and request.mimetype == "multipart/form-data":
        value = request.form.get("model")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise errors.bad_request("'model' must be a non-empty string: a rung of the ladder, such as bn")
    if value in ladder:
        return ladder[value]
    if value in ladder.values():
        return value
    raise errors.ApiError(404, "unknown_model", f"no digits model {value[:100]!r}; the known ones: "
                          f"{', '.join(ladder)} (or as served: {', '.join(ladder.values())})")
