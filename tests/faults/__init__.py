"""The fault suite: faults injected into every entry point, and the outcome each must have (README "Reliability").

Slow files carry `pytestmark = pytest.mark.faults` and run in `make test-faults` (CI runs it after `make test`);
quick ones are unmarked and run in `make test`.
"""
