"""Roles and the one permission table every endpoint consults."""

from __future__ import annotations

from enum import StrEnum

from conveyor.errors import Forbidden


class Role(StrEnum):
    """What a user or key may do within its tenant, from most to least powerful."""

    ADMIN = "admin"
    OPERATOR = "operator"
    MEMBER = "member"
    VIEWER = "viewer"

    @property
    def rank(self) -> int:
        """Return a number that grows with the role's power."""
        return len(Role) - list(Role).index(self)


class Permission(StrEnum):
    """An action an endpoint guards."""

    SUBMIT = "submit"
    READ = "read"
    CANCEL = "cancel"
    RETRY = "retry"
    MANAGE_SCHEDULES = "manage_schedules"
    MANAGE_KEYS = "manage_keys"
    MANAGE_USERS = "manage_users"
    SEE_QUEUES = "see_queues"
    SEE_AUDIT = "see_audit"
    MANAGE_WEBHOOKS = "manage_webhooks"
    MANAGE_LIMITS = "manage_limits"
    PAUSE_QUEUES = "pause_queues"


PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.OPERATOR: frozenset(
        {
            Permission.SUBMIT,
            Permission.READ,
            Permission.CANCEL,
            Permission.RETRY,
            Permission.MANAGE_SCHEDULES,
            Permission.MANAGE_KEYS,
            Permission.MANAGE_WEBHOOKS,
            Permission.SEE_QUEUES,
            Permission.MANAGE_LIMITS,
            Permission.PAUSE_QUEUES,
        }
    ),
    Role.MEMBER: frozenset({Permission.SUBMIT, Permission.READ}),
    Role.VIEWER: frozenset({Permission.READ}),
}


def check_permission(role: str, permission: Permission) -> None:
    """Raise `Forbidden` unless `role` holds `permission`."""
    if permission not in PERMISSIONS[Role(role)]:
        raise Forbidden(f"the {role} role may not {permission.value.replace('_', ' ')}")


def check_grant(granter: str, granted: str, *, action: str = "grant") -> None:
    """Raise `Forbidden` if `granter` would grant (or revoke) a role above its own."""
    if Role(granted).rank > Role(granter).rank:
        raise Forbidden(f"a {granter} cannot {action} the {granted} role")


def sees_internal_payloads(role: str) -> bool:
    """Return whether `role` may read internal jobs' payloads (webhook URLs): operators and up."""
    return Role(role).rank >= Role.OPERATOR.rank
