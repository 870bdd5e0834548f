"""demo.sh, the first command a newcomer runs, end to end in a few steps (the install step finds the test's
own environment already complete)."""
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="demo.sh installs into a virtual environment; "
                    "this interpreter is not one")
def test_demo_trains_and_writes_a_grid_of_every_class(tmp_path):
    env = {**os.environ, "VENV": sys.prefix, "DEMO_DIR": str(tmp_path / "demo"), "DEMO_STEPS": "2",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    grid = tmp_path / "demo" / "000-DiT-XXS-2" / "samples" / "grid.png"
    assert f"samples (one row per class):  {tmp_path / 'demo'}" in done.stdout
    with Image.open(grid) as image:  # ten rows and ten columns of 16x16 digits, with borders
        width, height = image.size
    assert width == height and width > 10 * 16
    assert (tmp_path / "demo" / "000-DiT-XXS-2" / "checkpoints" / "0000002.pt").is_file()
