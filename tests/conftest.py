import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # tests/ray_head.py

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_head():
    """One real `ray start --head` shared by the client and job tests."""
    from ray_head import start_head, stop_head

    head = start_head()
    if isinstance(head, str):
        pytest.skip(head)
    yield head
    stop_head(head)
