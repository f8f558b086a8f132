"""Benchmarks' way to the in-process host: ``tests/host/inprocess.py``, shared with the tests and the demo."""
import pathlib
import sys

_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from host.inprocess import setup_host  # noqa: E402,F401  (re-exported)

__all__ = ["setup_host"]
