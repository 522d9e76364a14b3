"""The live stack's fixture is `stack` (tests/stack.py, registered in tests/conftest.py)."""
