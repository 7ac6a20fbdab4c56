"""Fixtures of the fault suite: a short folder for Ray's files, and no process left behind."""

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from faultkit import STARTED


@pytest.fixture
def ray_tmp():
    """Ray's temporary folder for the processes of one test (short: socket paths must fit)."""
    path = Path(tempfile.mkdtemp(prefix="jray", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def end_started_processes():
    """A test that fails midway must not leave its driver (and its private Ray) running."""
    yield
    while STARTED:
        process = STARTED.pop()
        with contextlib.suppress(ProcessLookupError):  # the group is empty: all ended
            os.killpg(process.pid, signal.SIGKILL)  # the group: the driver and its Ray
        process.wait()
