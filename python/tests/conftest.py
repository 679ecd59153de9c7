"""pytest setup for the ksa_torch tests: they need torch (skipped without it) and an installed (or built in
place) ksa_torch; `cuda`-marked tests skip without a CUDA device."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

collect_ignore_glob = [] if HAVE_TORCH else ["test_*.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    if not HAVE_TORCH:
        print("ksa_torch tests: SKIPPED, torch is not importable (scripts/setup.sh installs Debian's python3-torch)")


def pytest_collection_modifyitems(config, items):
    if HAVE_TORCH and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
