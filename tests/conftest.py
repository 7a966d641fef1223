import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
if "KV_FABRIC_CACHE" not in os.environ:    # the run's own tokenizer cache, inherited by every
    _CACHE = tempfile.mkdtemp(prefix="kvf-cache-")   # process it starts (fabric/tokenizer.py)
    os.environ["KV_FABRIC_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
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
