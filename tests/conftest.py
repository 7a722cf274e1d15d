"""Every test process sees 8 fake CPU devices, so sharding is exercised without accelerators."""
import os

# Must happen before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# PyTorch's CUDA wheels bring Triton, which torch imports lazily (torch._dynamo, reached from e.g.
# nn.init under a device context in the parity tests). Loading Triton's native library into a process that
# already holds jaxlib and TensorFlow segfaulted the test worker (seen with torch 2.14.1), and the CPU tests
# never need it: a None entry makes `import triton` raise ImportError, which torch treats as "no Triton".
import sys  # noqa: E402

sys.modules.setdefault("triton", None)
