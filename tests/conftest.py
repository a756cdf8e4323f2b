import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402 (the repository's root is on the path from here on)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A weights folder as weights.md lays it out, holding the demo's tiny random models
    (no test writes into it: those that damage weights write their own)."""
    return demo.write_random_weights(tmp_path_factory.mktemp("weights"))
