"""The Ray adapter's private cluster: what trial processes start with."""

import ray

from jal_search import tune_adapter


def test_trial_processes_start_with_the_trial_environment():
    # glibc reads its malloc settings once, at exec: they must be in the process's initial
    # environment (/proc/self/environ), not set later by os.environ.
    cluster = tune_adapter.connect(None, 1)
    try:
        assert cluster.started_here and cluster.cpus == 1

        @ray.remote(num_cpus=1)
        def initial_environment() -> list[str]:
            with open("/proc/self/environ") as f:
                return f.read().split("\0")

        env = ray.get(initial_environment.remote())
    finally:
        tune_adapter.disconnect(cluster)
    assert not ray.is_initialized()
    for key, value in tune_adapter.TRIAL_ENV.items():
        assert f"{key}={value}" in env
    assert "MALLOC_MMAP_THRESHOLD_" in tune_adapter.TRIAL_ENV
