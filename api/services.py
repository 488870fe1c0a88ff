"""The long-lived objects a request needs, built once per process from settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flask import current_app, has_request_context
from redis import Redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.requests import request_id
from conveyor.auth.keys import PrincipalCache
from conveyor.broker.config import create_celery
from conveyor.broker.publisher import CeleryPublisher
from conveyor.db import create_db_engine, create_session_factory
from conveyor.ledger.gate import SubmitGate
from conveyor.ledger.work import Work
from conveyor.live.events import HUB_CLIENT, Hub
from conveyor.live.store import LiveStore
from conveyor.plugins import Domain, job_registry
from conveyor.registry import JobRegistry
from conveyor.settings import Settings


@dataclass
class Services:
    """Settings, database, Redis, publisher and registry for one API process."""

    settings: Settings
    engine: Engine
    # The ledger's units of work: every request that writes jobs opens one (conveyor.ledger).
    work: Work
    # Plain transactions for data that is not the ledger's: people, keys, webhooks, files.
    sessions: sessionmaker[Session]
    redis: Redis
    publisher: CeleryPublisher
    registry: JobRegistry
    key_cache: PrincipalCache
    # Whether a submitted job may go straight to the broker (flow control).
    gate: SubmitGate
    # This process's one subscription to committed job changes (streams, long polls).
    hub: Hub

    @property
    def live(self) -> LiveStore:
        """Return the store of live job views: the status poll's fast path."""
        assert self.work.live is not None, "the API writes and reads live views"
        return self.work.live

    @classmethod
    def from_settings(cls, settings: Settings, domains: Iterable[Domain] | None = None) -> Services:
        """Wire every service from settings (and the installed domains); nothing connects yet."""
        engine = create_db_engine(settings)
        celery = create_celery(settings, name="conveyor-api")
        redis = Redis.from_url(settings.result_backend, socket_timeout=2, socket_connect_timeout=2)
        publisher = CeleryPublisher(celery)
        work = Work(engine, LiveStore(redis, settings.result_expires), publisher, _request_id)
        return cls(
            settings=settings,
            engine=engine,
            work=work,
            sessions=create_session_factory(engine),
            redis=redis,
            publisher=publisher,
            registry=job_registry(settings, domains),
            key_cache=PrincipalCache(settings.api_key_cache_seconds),
            gate=SubmitGate.for_settings(settings, redis, work.reading),
            # Its own client: a subscription blocks on its socket longer than socket_timeout.
            hub=Hub(
                Redis.from_url(
                    settings.result_backend, socket_connect_timeout=2, client_name=HUB_CLIENT
                )
            ),
        )


def _request_id() -> str | None:
    """Return the id of the request being served, if any: its messages carry it."""
    return request_id() if has_request_context() else None


def services() -> Services:
    """Return the current app's services."""
    found: Services = current_app.extensions["conveyor"]
    return found
