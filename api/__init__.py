"""The Flask API: `create_app()` builds it; gunicorn runs `api:create_app()`."""

from __future__ import annotations

from flask import Flask
from flask_openapi3.blueprint import APIBlueprint

from api import (
    admission,
    audit,
    auth,
    console,
    errors,
    files,
    flow,
    health,
    hygiene,
    identity,
    job_control,
    job_types,
    jobs,
    json_provider,
    keys,
    metrics,
    openapi,
    plugins,
    queues,
    rate_limits,
    requests,
    schedules,
    streams,
    users,
    webhooks,
    workflows,
)
from api.services import Services
from conveyor.plugins import load_domains
from conveyor.settings import Settings
from conveyor.telemetry.logs import configure_logging
from conveyor.telemetry.tracing import install_tracing, instrument_flask


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """Build the API for `settings` (read from the environment when omitted)."""
    settings = settings or Settings()
    configure_logging(settings)
    # Off unless OTEL_* variables turn it on (docs/operations/tracing.md).
    install_tracing(settings, "conveyor-api")
    app = openapi.create_openapi(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    json_provider.init_app(app)
    # Installed business domains bring job types and routes (conveyor.plugins).
    domains = load_domains()
    services = services or Services.from_settings(settings, domains)
    app.extensions["conveyor"] = services
    # First of the request hooks: a request's span encloses the others (limits, auth).
    instrument_flask(app, settings)
    requests.init_app(app)
    hygiene.init_app(app, settings)
    metrics.init_app(app)
    errors.init_app(app)
    # Request hooks run in this order: limits per IP (and per principal), then the caller's
    # permission, then the body's syntax; flask-openapi3 validates the input last, and the
    # views that add jobs hold them to the tenant's quota once they are valid (admission).
    rate_limits.init_app(app, settings, identity.signin, console.SIGN_IN_FORMS)
    auth.init_app(app, settings)
    requests.init_body_checks(app)
    admission.init_app(app, settings)
    blueprints = (
        health.bp,
        identity.signin,
        identity.bp,
        users.bp,
        keys.bp,
        job_types.bp,
        jobs.bp,
        streams.bp,
        job_control.bp,
        schedules.bp,
        files.bp,
        queues.bp,
        flow.queues,
        flow.limits,
        audit.bp,
        webhooks.bp,
        workflows.bp,
    )
    for blueprint in (*blueprints, *plugins.domain_blueprints(services, domains)):
        # Each blueprint's operations go into the OpenAPI document as it is registered.
        assert isinstance(blueprint, APIBlueprint), f"{blueprint.name}: use an APIBlueprint"
        app.register_api(blueprint)
    # The operator console: server-rendered pages, outside the OpenAPI document.
    console.init_app(app, settings)
    return app
