"""The `conveyor` command: the API from the shell, tenant creation and migrations for operators.

`submit`, `status`, `list`, `cancel`, `retry`, `workflow …`, `schedules list` and
`keys create` go through the HTTP API (`conveyor.client`); `create-tenant` writes straight
to the database; `migrate` and `alembic` run Alembic with the core's and every domain's
revisions.
"""

from __future__ import annotations

import json
import secrets
import sys
from typing import TYPE_CHECKING, Any

import click

from conveyor.auth.roles import Role
from conveyor.client import ApiError, Client

if TYPE_CHECKING:
    from conveyor.settings import Settings

# The client commands import only what a client needs (click, httpx): `conveyor --help`
# and `conveyor submit` start in a tenth of the time. The operator commands that open the
# database import SQLAlchemy, the settings and the core when they run; a test keeps it so.


def create_tenant(
    settings: Settings, *, name: str, email: str, password: str | None, key_role: Role
) -> dict[str, str]:
    """Create a tenant, its admin (with a generated password if none given) and an API key."""
    from datetime import UTC, datetime

    from conveyor.auth.bootstrap import create_tenant_identity
    from conveyor.db import create_db_engine, create_session_factory

    password = password or secrets.token_urlsafe(12)
    engine = create_db_engine(settings)
    try:
        with create_session_factory(engine).begin() as session:
            identity = create_tenant_identity(
                session,
                settings.secret_key.get_secret_value(),
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


def _print(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group()
@click.option("--url", envvar="CONVEYOR_URL", default="http://127.0.0.1:8000", show_default=True)
@click.option("--key", envvar="CONVEYOR_API_KEY", default="", help="API key (or CONVEYOR_API_KEY)")
@click.pass_context
def main(ctx: click.Context, url: str, key: str) -> None:
    """Conveyor from the shell."""
    # Keep what the caller put there (tests pass a client wired to an in-process app).
    ctx.ensure_object(dict).update(url=url, key=key)


def _client(ctx: click.Context) -> Client:
    found: Client | None = ctx.obj.get("client")
    if found is not None:
        return found
    if not ctx.obj["key"]:
        raise click.UsageError("set CONVEYOR_API_KEY or pass --key")
    return Client(ctx.obj["url"], ctx.obj["key"])


@main.command()
@click.argument("job_type")
@click.option("--payload", default="{}", help="the payload as JSON")
@click.option("--wait", is_flag=True, help="wait for the job to finish, with a progress bar")
@click.option("--idempotency-key", default=None)
@click.option("--limit-key", default=None, help="count against the tenant's limit of this name")
@click.option("--unique-key", default=None, help="answer with the unfinished job holding this key")
@click.pass_context
def submit(
    ctx: click.Context,
    job_type: str,
    payload: str,
    wait: bool,
    idempotency_key: str | None,
    limit_key: str | None,
    unique_key: str | None,
) -> None:
    """Submit a job; with --wait, print the finished job."""
    client = _client(ctx)
    options = {"limit_key": limit_key, "unique_key": unique_key}
    job = client.submit(
        job_type,
        json.loads(payload),
        idempotency_key=idempotency_key,
        **{name: value for name, value in options.items() if value is not None},
    )
    if not wait:
        _print(job)
        return
    with click.progressbar(length=100, label=job["id"], file=sys.stderr) as bar:

        def show(update: dict[str, Any]) -> None:
            percent = (update.get("progress") or {}).get("percent") or 0
            bar.update(max(0, int(percent) - bar.pos))

        job = client.wait(job["id"], on_update=show)
        bar.update(100 - bar.pos)
    _print(job)
    if job["state"] != "succeeded":
        ctx.exit(1)


@main.command()
@click.argument("job_id")
@click.pass_context
def status(ctx: click.Context, job_id: str) -> None:
    """Show a job."""
    _print(_client(ctx).get(job_id))


@main.command(name="list")
@click.option("--state", default=None)
@click.option("--type", "job_type", default=None)
@click.option("--limit", default=20, show_default=True)
@click.pass_context
def list_jobs(ctx: click.Context, state: str | None, job_type: str | None, limit: int) -> None:
    """List recent jobs, one line each."""
    filters = {k: v for k, v in {"state": state, "type": job_type}.items() if v}
    for n, job in enumerate(_client(ctx).jobs(limit=min(limit, 200), **filters)):
        if n >= limit:
            break
        click.echo(f"{job['id']}  {job['state']:<10} {job['type']}  {job['created_at']}")


@main.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a job."""
    _print(_client(ctx).cancel(job_id))


@main.command()
@click.argument("job_id")
@click.pass_context
def retry(ctx: click.Context, job_id: str) -> None:
    """Retry a dead job."""
    _print(_client(ctx).retry(job_id))


@main.group()
def schedules() -> None:
    """Recurring jobs."""


@schedules.command(name="list")
@click.pass_context
def list_schedules(ctx: click.Context) -> None:
    """List schedules."""
    _print(_client(ctx).list_schedules())


@main.group()
def keys() -> None:
    """API keys."""


@keys.command(name="create")
@click.argument("name")
@click.option("--role", default="member", show_default=True)
@click.pass_context
def create_key(ctx: click.Context, name: str, role: str) -> None:
    """Create an API key (its secret is printed once)."""
    _print(_client(ctx).create_key(name, role))


@main.group()
def limits() -> None:
    """Limits: how many jobs of a key run at once, and how often they start."""


@limits.command(name="set")
@click.argument("key")
@click.option("--max-running", type=int, default=None, help="at most this many at once")
@click.option("--per-second", type=float, default=None, help="starts spaced to this rate")
@click.pass_context
def set_limit(
    ctx: click.Context, key: str, max_running: int | None, per_second: float | None
) -> None:
    """Create or change a limit; jobs submitted with `limit_key=KEY` count against it."""
    _print(_client(ctx).set_limit(key, max_running=max_running, per_second=per_second))


@limits.command(name="get")
@click.argument("key")
@click.pass_context
def get_limit(ctx: click.Context, key: str) -> None:
    """Show a limit with its running and waiting jobs."""
    _print(_client(ctx).get_limit(key))


@limits.command(name="list")
@click.pass_context
def list_limits(ctx: click.Context) -> None:
    """List the tenant's limits."""
    _print(_client(ctx).list_limits())


@limits.command(name="delete")
@click.argument("key")
@click.pass_context
def delete_limit(ctx: click.Context, key: str) -> None:
    """Remove a limit (its jobs run unlimited)."""
    _client(ctx).delete_limit(key)


@main.group()
def queues() -> None:
    """Queues: what they hold, and pausing them."""


@queues.command(name="list")
@click.pass_context
def list_queues(ctx: click.Context) -> None:
    """Show each queue's depth, the tenant's queued and running jobs, and pauses."""
    _print(_client(ctx).queues())


@queues.command(name="pause")
@click.argument("queue")
@click.option(
    "--all-tenants", is_flag=True, help="for the whole deployment (in the database; operators)"
)
@click.pass_context
def pause_queue(ctx: click.Context, queue: str, all_tenants: bool) -> None:
    """Hold the jobs in QUEUE (running ones finish) until resumed."""
    if all_tenants:
        _pause_everywhere(queue, paused=True)
        _print({"queue": queue, "paused": True, "tenants": "all"})
    else:
        _print(_client(ctx).pause_queue(queue))


@queues.command(name="resume")
@click.argument("queue")
@click.option("--all-tenants", is_flag=True, help="lift the deployment-wide pause")
@click.pass_context
def resume_queue(ctx: click.Context, queue: str, all_tenants: bool) -> None:
    """Let the jobs in QUEUE start again."""
    if all_tenants:
        _pause_everywhere(queue, paused=False)
        _print({"queue": queue, "paused": False, "tenants": "all"})
    else:
        _print(_client(ctx).resume_queue(queue))


def _pause_everywhere(queue: str, *, paused: bool) -> None:
    """Pause or resume a queue for every tenant, straight in the database."""
    from conveyor.db import create_db_engine
    from conveyor.ledger import flow
    from conveyor.ledger.work import Work
    from conveyor.settings import Settings

    engine = create_db_engine(Settings())
    try:
        with Work(engine, None).begin() as unit:
            (flow.pause if paused else flow.resume)(unit, None, queue)
    finally:
        engine.dispose()


@main.group()
def workflow() -> None:
    """Submit, show, list and cancel workflows."""


@workflow.command(name="submit")
@click.argument("file", type=click.File())
@click.option("--idempotency-key", default=None)
@click.pass_context
def submit_workflow(ctx: click.Context, file: Any, idempotency_key: str | None) -> None:
    """Submit a workflow from a JSON file (`{"name": …, "jobs": [...]}`; `-` for stdin)."""
    body = json.load(file)
    found = _client(ctx).submit_workflow(
        body["name"], body["jobs"], idempotency_key=idempotency_key
    )
    click.echo(render_tree(found))


@workflow.command(name="show")
@click.argument("workflow_id")
@click.option("--json", "as_json", is_flag=True, help="print the workflow as JSON")
@click.pass_context
def show_workflow(ctx: click.Context, workflow_id: str, as_json: bool) -> None:
    """Show a workflow as a tree of its jobs with their states."""
    found = _client(ctx).workflow(workflow_id)
    if as_json:
        _print(found)
    else:
        click.echo(render_tree(found))


@workflow.command(name="list")
@click.option("--state", default=None)
@click.option("--name", default=None)
@click.option("--limit", default=20, show_default=True)
@click.pass_context
def list_workflows(ctx: click.Context, state: str | None, name: str | None, limit: int) -> None:
    """List workflows, newest first."""
    filters = {k: v for k, v in {"state": state, "name": name}.items() if v is not None}
    for n, found in enumerate(_client(ctx).workflows(limit=limit, **filters)):
        if n >= limit:
            break
        click.echo(f"{found['id']}  {found['state']:<9}  {found['total']:>5} jobs  {found['name']}")


@workflow.command(name="cancel")
@click.argument("workflow_id")
@click.pass_context
def cancel_workflow(ctx: click.Context, workflow_id: str) -> None:
    """Cancel every unfinished job of a workflow."""
    click.echo(render_tree(_client(ctx).cancel_workflow(workflow_id)))


def render_tree(found: dict[str, Any]) -> str:
    """Draw a workflow as a tree: each job under the last of its dependencies, with its state.

    A job with several dependencies appears under the last one listed, and says which
    others it waits for (`also after …`); roots are the jobs that depend on nothing.
    """
    jobs = found["jobs"]
    label = {job["ref"] or job["id"]: job for job in jobs}
    children: dict[str | None, list[str]] = {}
    for job in jobs:
        parents = [ref for ref in job["depends_on"] if ref in label]
        children.setdefault(parents[-1] if parents else None, []).append(job["ref"] or job["id"])
    lines = [f"{found['name']} ({found['id']}): {found['state']}"]

    def draw(ref: str, prefix: str, last: bool) -> None:
        job = label[ref]
        others = [r for r in job["depends_on"] if r in label][:-1]
        state = job["state"] + (f", waiting for {job['waiting_for']}" if job["waiting_for"] else "")
        extra = f"  (also after {', '.join(others)})" if others else ""
        error = f"  - {job['error']['message']}" if job.get("error") else ""
        lines.append(
            f"{prefix}{'└── ' if last else '├── '}{ref} [{job['type']}] {state}{extra}{error}"
        )
        kids = children.get(ref, [])
        for n, kid in enumerate(kids):
            draw(kid, prefix + ("    " if last else "│   "), n == len(kids) - 1)

    roots = children.get(None, [])
    for n, ref in enumerate(roots):
        draw(ref, "", n == len(roots) - 1)
    return "\n".join(lines)


@main.command(name="create-tenant")
@click.option("--name", required=True)
@click.option("--email", required=True)
@click.option("--password", default=None, help="the admin's password (default: generated)")
@click.option("--key-role", default=Role.ADMIN.value, type=click.Choice([r.value for r in Role]))
def create_tenant_command(name: str, email: str, password: str | None, key_role: str) -> None:
    """Create a tenant, its admin user and an API key, straight in the database."""
    from conveyor.errors import ConveyorError
    from conveyor.settings import Settings

    try:
        created = create_tenant(
            Settings(), name=name, email=email, password=password, key_role=Role(key_role)
        )
    except ConveyorError as exc:
        raise click.ClickException(exc.detail) from exc
    _print(created)


# Where Alembic's own command line looks for its config: ALEMBIC_CONFIG, else alembic.ini.
# (Alembic is imported by the commands that use it: the API commands start faster.)
_CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    envvar="ALEMBIC_CONFIG",
    default="alembic.ini",
    show_default=True,
    type=click.Path(exists=True, dir_okay=False),
)


@main.command()
@click.argument("revision", default="heads")
@_CONFIG_OPTION
def migrate(revision: str, config_file: str) -> None:
    """Upgrade the database: the core's revisions and every installed domain's."""
    from conveyor import migrations

    migrations.upgrade(migrations.alembic_config(config_file), revision)


@main.command(
    name="alembic", context_settings={"ignore_unknown_options": True, "help_option_names": []}
)
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@_CONFIG_OPTION
def alembic_command(arguments: tuple[str, ...], config_file: str) -> None:
    """Run any Alembic command (history, downgrade, revision …) with every domain's revisions."""
    from alembic.config import CommandLine

    from conveyor import migrations

    alembic = CommandLine(prog="conveyor alembic")
    options = alembic.parser.parse_args(arguments)
    if not hasattr(options, "cmd"):
        alembic.parser.error("too few arguments")
    config = migrations.alembic_config(config_file)
    config.cmd_opts = options
    alembic.run_cmd(config, options)


def run() -> None:
    """Entry point: turn API errors into a message and a non-zero exit."""
    try:
        main(standalone_mode=True)
    except ApiError as exc:
        click.echo(f"conveyor: {exc}", err=True)
        for error in exc.errors:
            click.echo(f"  {error.get('field')}: {error.get('message')}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
