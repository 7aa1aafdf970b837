"""`moeray quickstart` end to end (the README's first command), on the test session's cluster."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)


def test_quickstart_streams_requests_and_shuts_down(ray_cluster):
    from ray import serve

    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled"}
    try:
        done = subprocess.run([sys.executable, "-m", "cli", "quickstart", "--max-tokens", "8"],
                              env=env, capture_output=True, text=True, timeout=420)
    finally:
        serve.shutdown()  # the quickstart joined this cluster: it leaves Serve itself running
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "GET /v1/models -> " in out and "> chat (stream)" in out
    assert "from the latent cache" in out and "tokens per expert actor" in out
    assert "quickstart finished" in out
