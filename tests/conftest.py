"""Shared fixtures: a private Ray local cluster (real, not mocked) and quiet, isolated caches."""

import os

import pytest

# Keep test runs from writing into the user's cache; the embedded MNIST cache is rebuilt once.
os.environ.setdefault("JAL_SEARCH_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


@pytest.fixture(scope="module")
def local_ray():
    """A private 2-CPU Ray for one test module, shut down in teardown."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
