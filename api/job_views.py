"""What a caller may see of a job: every job view the API returns passes through `shown`."""

from __future__ import annotations

from typing import Any

from api.auth import current_principal
from api.services import services
from conveyor.auth.roles import sees_internal_payloads


def shown(view: dict[str, Any]) -> dict[str, Any]:
    """Return a job view as the caller may see it: internal jobs' payloads are {} below operator."""
    if sees_internal_payloads(current_principal().role):
        return view
    if not services().registry.is_internal(view["type"]):
        return view
    # A copy: the view may be the Redis snapshot every role's poll reads.
    return {**view, "payload": {}}
