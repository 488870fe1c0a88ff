"""The sample business domain: orders imported from CSV, revenue rolled up, orders exported.

Delete this package, its migration (`0007_orders`), its lines in `migrations/env.py` and
its entries in `CONVEYOR_JOB_MODULES` / `CONVEYOR_API_MODULES` to replace it with your own.
Its job-type modules hold plain functions and Pydantic models, never Celery code: the API
imports them (by configuration) to validate payloads.
"""
