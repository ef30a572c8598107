"""Load-test harness: ``python -m service.bench`` (see docs/service.md)."""
