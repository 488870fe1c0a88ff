"""Development tooling: `make run` and the embedded servers of `make run` and `make test`.

Not part of the shipped package (the wheel holds conveyor, api, worker and domains).
"""
