import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session."""
    import ray

    from cluster.graph import NAMESPACE

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        namespace=NAMESPACE,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny random checkpoints with visible logits: A (greedy) and B (group-limited, YaRN)."""
    from .reference import CONFIGS, random_model

    folders = {}
    for name, config in CONFIGS.items():
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        random_model(config, seed=11).save_pretrained(folder)
        folders[name] = folder
    return folders
