"""Sign-up tells whether an email is registered; acceptable only because production keeps it shut.

Answering uniformly would need email verification, which Conveyor does not have
(docs/guides/authentication.md, "Sign-up and email enumeration"). These tests pin what
makes the oracle acceptable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conveyor.settings import Settings
from tests.test_api import assert_problem
from tests.test_identity import register

TAKEN = "taken@example.com"
FRESH = "nobody-yet@example.com"


def test_production_keeps_sign_up_shut_unless_told_otherwise(settings: Settings) -> None:
    production = settings.model_copy(update={"env": "production", "signup": None})
    assert production.signup_open is False
    assert production.model_copy(update={"signup": "open"}).signup_open is True


def test_shut_sign_up_answers_a_taken_and_a_fresh_email_alike(
    make_app: Callable[..., Any], committed: None
) -> None:
    assert register(make_app(signup="open").test_client(), TAKEN).status_code == 201
    client = make_app(env="production", signup=None).test_client()
    taken, fresh = register(client, TAKEN), register(client, FRESH)
    bodies = [assert_problem(r, 403) for r in (taken, fresh)]
    for body in bodies:
        body.pop("request_id")
    assert bodies[0] == bodies[1]
    assert taken.headers.get("Content-Type") == fresh.headers.get("Content-Type")
    assert set(taken.headers.keys()) == set(fresh.headers.keys())


def test_open_sign_up_is_the_oracle_the_readme_warns_about(
    make_app: Callable[..., Any], committed: None
) -> None:
    client = make_app(signup="open").test_client()
    assert register(client, TAKEN).status_code == 201
    assert_problem(register(client, TAKEN), 409)
    assert register(client, FRESH).status_code == 201
