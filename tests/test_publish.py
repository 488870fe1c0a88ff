"""The batch publisher sends what Celery's send_task would, and one list of sent events."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.signals import before_task_publish
from kombu import Producer

from conveyor.broker.config import create_celery
from conveyor.broker.publisher import CeleryPublisher, Message
from conveyor.settings import Settings


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """Collect every task message about to be published, as Celery's signal shows it."""
    seen: list[dict[str, Any]] = []

    def record(**kwargs: Any) -> None:
        seen.append(kwargs)

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def test_each_message_is_the_one_send_task_builds(
    settings: Settings, published: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_celery(settings, name="publish-test")
    publisher = CeleryPublisher(app)
    queue = f"{settings.default_queue}-publish"
    job_id = uuid.uuid4()
    # Nothing reaches the broker: only the messages are compared.
    monkeypatch.setattr(Producer, "publish", lambda *_, **__: None)
    publisher.publish([Message(job_id, "system.noop", queue, priority=7, request_id="r-1")])
    app.send_task(
        "system.noop",
        args=[str(job_id)],
        task_id=str(job_id),
        queue=queue,
        priority=2,
        ignore_result=True,
        headers={"conveyor_request_id": "r-1"},
    )
    ours, celery = published
    for key in ("body", "exchange", "routing_key", "headers", "properties"):
        assert ours[key] == celery[key], key
    assert ours["headers"]["conveyor_request_id"] == "r-1"


def test_sent_events_go_out_as_one_list(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_celery(settings, name="publish-test")
    publisher = CeleryPublisher(app)
    sent: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(Producer, "publish", lambda _, body, **kw: sent.append((body, kw)))
    ids = [uuid.uuid4() for _ in range(3)]
    publisher.publish([Message(job_id, "system.noop", "q") for job_id in ids])
    tasks = [body for body, kw in sent if kw["routing_key"] == "q"]
    events = [body for body, kw in sent if kw["routing_key"] == "task.multi"]
    assert len(tasks) == 3
    assert len(events) == 1
    assert [e["uuid"] for e in events[0]] == [str(job_id) for job_id in ids]
    assert {e["type"] for e in events[0]} == {"task-sent"}
    assert all(e["queue"] == "q" and e["name"] == "system.noop" for e in events[0])


def test_each_queue_is_declared_once_per_call(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_celery(settings, name="publish-test")
    publisher = CeleryPublisher(app)
    sent: list[tuple[str, list[Any]]] = []
    monkeypatch.setattr(
        Producer, "publish", lambda _, body, **kw: sent.append((kw["routing_key"], kw["declare"]))
    )
    queues = ["a", "a", "b", "a"]
    publisher.publish([Message(uuid.uuid4(), "system.noop", q) for q in queues])
    declared = [(key, [q.name for q in declare]) for key, declare in sent if key != "task.multi"]
    assert declared == [("a", ["a"]), ("a", []), ("b", ["b"]), ("a", [])]
