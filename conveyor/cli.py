"""`conveyor` command line: operator tasks that need no running API."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from datetime import UTC, datetime

from conveyor.bootstrap import create_tenant_identity
from conveyor.db import create_db_engine, create_session_factory
from conveyor.errors import ConveyorError
from conveyor.roles import Role
from conveyor.settings import Settings


def create_tenant(
    settings: Settings, *, name: str, email: str, password: str | None, key_role: Role
) -> dict[str, str]:
    """Create a tenant, its admin (with a generated password if none given) and an API key."""
    password = password or secrets.token_urlsafe(12)
    engine = create_db_engine(settings)
    try:
        with create_session_factory(engine).begin() as session:
            identity = create_tenant_identity(
                session,
                settings.secret_key,
                tenant_name=name,
                email=email,
                password=password,
                key_role=key_role,
                now=datetime.now(UTC),
            )
    finally:
        engine.dispose()
    return {
        "tenant_id": str(identity.tenant.id),
        "email": identity.user.email,
        "password": password,
        "api_key": identity.token,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command; print its result as JSON."""
    parser = argparse.ArgumentParser(prog="conveyor")
    commands = parser.add_subparsers(dest="command", required=True)
    tenant = commands.add_parser(
        "create-tenant", help="create a tenant, its admin user and an API key"
    )
    tenant.add_argument("--name", required=True)
    tenant.add_argument("--email", required=True)
    tenant.add_argument("--password", help="the admin's password (default: generated)")
    tenant.add_argument("--key-role", default=Role.ADMIN.value, choices=[r.value for r in Role])
    args = parser.parse_args(argv)
    try:
        created = create_tenant(
            Settings(),
            name=args.name,
            email=args.email,
            password=args.password,
            key_role=Role(args.key_role),
        )
    except ConveyorError as exc:
        print(f"conveyor: {exc.detail}", file=sys.stderr)
        return 1
    print(json.dumps(created, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
