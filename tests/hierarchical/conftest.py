"""One tiny random-weight model per test session (built once: the decoder is SAM's full-size one)."""

import pytest

from tests.helpers import tiny_model


@pytest.fixture(scope="session")
def tiny_sam():
    return tiny_model("tinyvit_test")
