"""Suite-wide settings: one torch thread per test worker (two xdist workers share two cores)."""

import os
import tempfile

import torch


def pytest_configure(config):  # noqa: ANN001, D103
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
    # measured layouts (duomo.tasks.layout) are remembered in a file of this run, never in the user's cache
    os.environ["DUOMO_LAYOUTS"] = os.path.join(tempfile.mkdtemp(prefix="duomo-layouts-"), "layouts.json")
