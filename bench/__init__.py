"""`make bench`: Conveyor against the bare Flask + Celery stack, on the same servers."""
