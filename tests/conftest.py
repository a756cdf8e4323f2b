import os
import sys
from pathlib import Path

# Triton reads this once, whichever test imports it first: its kernels run in its interpreter
# (numpy, on the CPU) in every test (tests/test_triton_ops.py, tests/test_vae_layout.py)
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402 (the repository's root is on the path from here on)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A weights folder as weights.md lays it out, holding the demo's tiny random models
    (no test writes into it: those that damage weights write their own)."""
    return demo.write_random_weights(tmp_path_factory.mktemp("weights"))
