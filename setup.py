"""npp_jax: Next Patch Prediction (arXiv 2412.15321) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="npp_jax",
    version="0.1.0",
    description="Next Patch Prediction for autoregressive image generation, in JAX/Flax.",
    packages=setuptools.find_packages(include=["npp_jax", "npp_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "chex>=0.1.88",
        "ml-collections>=1.0.0",
        "clu>=0.0.12",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.7.0",
        # clu's metric writers import TensorFlow for TensorBoard summaries.
        "tensorflow-cpu>=2.18.0",
        "tensorboard>=2.18.0",
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "tqdm>=4.66",
    ],
    extras_require={
        # Only the PyTorch <-> JAX checkpoint converter (and its parity tests) need torch.
        "torch": ["torch>=2.4"],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.3",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "torch>=2.4",
            "pytorch-fid>=0.3.0",  # The FID Inception parity tests build pytorch-fid's own modules.
        ],
    },
)
