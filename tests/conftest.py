"""Fixtures every package's tests may use (pytest loads this file for any test under tests/)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny tensors gain nothing from intra-op threads, and
    on the shared 2-core machines (``-n 2``) extra threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
