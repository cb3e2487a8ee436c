"""One local Ray per test session for every integration test (startup dominates: ~5 s once)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024**2,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
