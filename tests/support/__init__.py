"""Plain helpers shared by several test files (`from tests.support.X import ...`).
Fixtures live in tests/conftest.py; no test module imports from another."""
