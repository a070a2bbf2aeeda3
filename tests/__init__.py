"""Test package: makes `tests.helpers` importable from every test directory."""
