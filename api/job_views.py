"""What a caller may see of a job: every job view the API returns passes through `shown`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.auth import current_principal
from api.services import services
from conveyor.auth.roles import sees_internal_payloads

View = dict[str, Any]


def shown(view: View) -> View:
    """Return a job view as the caller may see it: internal jobs' payloads are {} below operator."""
    return shown_to_caller()(view)


def shown_to_caller() -> Callable[[View], View]:
    """Return `shown` bound to this request's caller, for a stream that outlives the request."""
    if sees_internal_payloads(current_principal().role):
        return _as_is
    is_internal = services().registry.is_internal

    def mask(view: View) -> View:
        if not is_internal(view["type"]):
            return view
        # A copy: the view may be the Redis snapshot every role's poll reads.
        return {**view, "payload": {}}

    return mask


def _as_is(view: View) -> View:
    return view
