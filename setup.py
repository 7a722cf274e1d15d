"""npp_jax: Next Patch Prediction (arXiv 2412.15321) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="npp_jax",
    version="0.1.0",
    description="Next Patch Prediction for autoregressive image generation, in JAX/Flax.",
    packages=setuptools.find_packages(include=["npp_jax", "npp_jax.*"]),
    python_requires=">=3.11",  # As jax 0.7.1 (the lower bound below).
    # Lower bounds are the oldest releases the code runs with, tested: CI runs the suite with every direct
    # dependency pinned to its bound (.ci/lower-bounds.txt). No TensorFlow: it has no macOS or Linux aarch64
    # wheels of the -cpu build and clashes with the `tensorflow` preinstalled on Colab and TPU VMs, so
    # TensorBoard summaries are written by `tensorboard` alone (npp_jax/summaries.py) and TFDS runs TF-less.
    install_requires=[
        "jax>=0.7.1",  # jax.set_mesh.
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.17",  # Older releases use jax.experimental.layout.DeviceLocalLayout (gone in 0.7).
        "ml-collections>=1.0.0",
        "grain>=0.2.12",  # grain.MultiprocessingOptions at the top level.
        "tensorflow-datasets>=4.9.10",  # Older releases read FieldDescriptor.label, gone in protobuf 7.
        "array-record>=0.8.1",  # TFDS writes the code data set as array_record; grain 0.2.12 needs >= 0.8.
        "tensorboard>=2.18.0",
        # epath.Path.absolute(); gcsfs for gs:// workdirs and TensorBoard files, which TF's gfile served before.
        "etils[epath,epath-gcs]>=1.14.0",
        "scipy>=1.12.0",  # Frechet distance (sqrtm); jax 0.7.1 needs >= 1.12 anyway.
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "tqdm>=4.66",
    ],
    extras_require={
        # Only the PyTorch <-> JAX checkpoint converter (and its parity tests) need torch.
        "torch": ["torch>=2.4"],
        "test": [
            "chex>=0.1.88",
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.3",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "torch>=2.4",
            "pytorch-fid>=0.3.0",  # The FID Inception parity tests build pytorch-fid's own modules.
            # tests/test_gcs.py serves gs:// on loopback (the oldest release tried; older ones untested).
            "gcp-storage-emulator>=2026.7.19",
        ],
    },
)
