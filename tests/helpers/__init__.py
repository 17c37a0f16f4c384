"""Helpers shared by several test modules (builders, runners, tolerances). Fixtures live in tests/conftest.py;
a test module imports from here, never from another test module."""
