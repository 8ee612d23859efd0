"""Test set-up: 8 simulated CPU devices and a persistent XLA compilation cache, set before JAX is imported.

The cache (in the system temp dir, shared by the subprocesses the tests start) lets the many small runs of the
same micro config compile once per suite instead of once per run.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "vlm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# rendered synthetic shards (content-addressed, reused across tests and runs; never the user's ~/.cache)
os.environ.setdefault("VLM_JAX_CACHE", os.path.join(tempfile.gettempdir(), "vlm_jax_test_data_cache"))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "interop: parity with torch / open_clip / transformers (needs the interop extra; "
      "each test importorskips what it needs)")
  config.addinivalue_line(
      "markers", "faults: the slow part of the fault suite (tests/faults/), run by `make test-faults`, not by "
      "`make test`")
  config.addinivalue_line(
      "markers", "notebooks: executes notebooks/*.ipynb in fresh kernels (tests/test_notebooks.py), run by "
      "`make test-notebooks`, not by `make test`")


# --- the cached pretrained models (tests/pretrained.py): trained once per code version, reused by every test ---
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pretrained_resnet() -> str:
  """Run directory of the tiny ResNet CLIP (built on first use; see tests/pretrained.py)."""
  from tests.pretrained import pretrained_run  # noqa: PLC0415
  return pretrained_run("resnet")


@pytest.fixture(scope="session")
def pretrained_vit() -> str:
  """Run directory of the tiny ViT CLIP (built on first use; see tests/pretrained.py)."""
  from tests.pretrained import pretrained_run  # noqa: PLC0415
  return pretrained_run("vit")
