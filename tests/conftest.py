"""Every test process sees 8 fake CPU devices, so sharding is exercised without accelerators."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent XLA compilation cache for the whole run: dozens of CLI subprocesses (and both xdist
# workers) compile the same tiny models, the same Inception and the same samplers; from the second
# time on they load the executable instead (the same executable, so bit-exact tests are unaffected).
# The pytest process that starts first creates it and the workers and CLI subprocesses inherit the
# variable; it is removed when that process exits. Set JAX_COMPILATION_CACHE_DIR yourself to keep
# one between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="npp_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# PyTorch's CUDA wheels bring Triton, which torch imports lazily (torch._dynamo, reached from e.g.
# nn.init under a device context in the parity tests). Loading Triton's native library into a
# process that already holds jaxlib and TensorFlow segfaulted the test worker (seen with torch
# 2.14.1), and the CPU tests never need it: a None entry makes `import triton` raise ImportError,
# which torch treats as "no Triton".
import sys  # noqa: E402

sys.modules.setdefault("triton", None)


# --dist loadfile hands whole files to the two workers, one at a time, from a work queue. xdist's
# default queue puts the files with the most tests first, and so the slowest files last
# (test_gcs.py: 5 tests, test_demo.py: 3, each minutes long): one worker ran them alone while
# the other sat idle. Here the slowest files go first (longest job first), then the rest as xdist
# orders them. From timings on 2 cores (Intel Xeon, 2026-12); a stale list costs balance only.
_SLOWEST_FIRST = (
  "test_gcs.py",
  "test_demo.py",
  "test_train.py",
  "test_bad_inputs.py",
  "test_evaluate.py",
  "test_sample_metrics.py",
  "test_sample.py",
  "test_multiprocess.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  import collections

  def path(item):
    return item.nodeid.split("::")[0]

  counts = collections.Counter(path(item) for item in items)

  def rank(item):
    name = os.path.basename(path(item))
    first = _SLOWEST_FIRST.index(name) if name in _SLOWEST_FIRST else len(_SLOWEST_FIRST)
    return first, -counts[path(item)], path(item)

  items.sort(key=rank)  # Stable: the order within a file is kept.
