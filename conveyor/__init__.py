"""Conveyor's core: settings, data, the job lifecycle and registry, auth primitives.

Nothing here imports `api` or `worker`; both depend on this package.
"""
