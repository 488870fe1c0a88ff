"""Conveyor's core: settings, data, the job lifecycle and registry, auth primitives.

Nothing here imports `api`, `worker` or a domain (it finds domains through entry points,
`conveyor.plugins`); they all depend on this package.
"""
