"""Fault: the driver is killed while MLflow builds a new SQLite store's schema (alembic
migrations, ~1.5 s at a search's start, in the tracker's background). Promise: the store is
created whole or not at all, so the next run, resume or sync opens it and records the search.
(Before, a file killed 0.2–0.5 s into its migrations failed every later open: "index ...
already exists".)"""

import subprocess
import sys
import time

import pytest

from jal_search.tracking import Tracker


@pytest.mark.parametrize("seconds", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_a_store_killed_while_its_schema_is_built_is_built_again(seconds, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"import jal_search.tracking as t; t.Tracker({uri!r}, 'x').client.search_experiments()"
    builder = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("mlflow.db")):  # its first table is being written
        assert builder.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(seconds)  # into the migrations
    builder.kill()
    builder.wait()
    client = Tracker(uri, "after").client
    experiment = client.create_experiment("after")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "val_acc", 0.5, step=1)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.5]
