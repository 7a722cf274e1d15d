"""Every test process sees 8 fake CPU devices, so sharding is exercised without accelerators."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent XLA compilation cache for the whole run: dozens of CLI subprocesses (and both xdist
# workers) compile the same tiny models, the same Inception and the same samplers; from the second time on
# they load the executable instead (the same executable, so bit-exact tests are unaffected). The pytest
# process that starts first creates it and the workers and CLI subprocesses inherit the variable; it is
# removed when that process exits. Set JAX_COMPILATION_CACHE_DIR yourself to keep one between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="npp_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# PyTorch's CUDA wheels bring Triton, which torch imports lazily (torch._dynamo, reached from e.g.
# nn.init under a device context in the parity tests). Loading Triton's native library into a process that
# already holds jaxlib and TensorFlow segfaulted the test worker (seen with torch 2.14.1), and the CPU tests
# never need it: a None entry makes `import triton` raise ImportError, which torch treats as "no Triton".
import sys  # noqa: E402

sys.modules.setdefault("triton", None)
