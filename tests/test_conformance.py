"""Every strategy against the shared contract (see tests/conformance.py)."""

from tests.conformance import LockConformance


class TestFileStrategy(LockConformance):
    strategy = "file"


class TestMemoryStrategy(LockConformance):
    strategy = "memory"
