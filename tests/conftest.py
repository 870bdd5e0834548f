import logging
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (test.sh runs two workers) each worker gets its share of the cores: two workers with
# two threads each on a 2-core CI machine would slow each other down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _close_train_logger():
    """In-process runs attach handlers (a log.txt file, the captured stdout) to the "train" logger."""
    yield
    logger = logging.getLogger("train")
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


@pytest.fixture
def repo_root():
    return ROOT
