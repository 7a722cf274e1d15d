"""npp_jax: Next Patch Prediction (arXiv 2412.15321) in JAX/Flax."""

import setuptools

setuptools.setup(
  name="npp_jax",
  version="0.1.0",
  description="Next Patch Prediction for autoregressive image generation, in JAX/Flax.",
  packages=setuptools.find_packages(include=["npp_jax", "npp_jax.*"]),
  python_requires=">=3.11",  # As jax 0.10.
  # Lower bounds are the releases the whole suite passed with (CI installs exactly these through
  # .ci/lower-bounds.txt). Older ones are not claimed: at jax 0.7.1 / grain 0.2.12 / orbax 0.11.17
  # the suite failed 14 tests (data order, extraction, the VQ trainer; docs/performance.md,
  # "Dependencies"). No TensorFlow: it has no macOS or Linux aarch64 wheels of the -cpu build and
  # clashes with the `tensorflow` preinstalled on Colab and TPU VMs, so TensorBoard summaries are
  # written by `tensorboard` alone (npp_jax/summaries.py) and TFDS runs TF-less.
  install_requires=[
    "jax>=0.10.2",  # jax.set_mesh needs >= 0.7.1; older releases than this one failed the suite.
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",  # Older releases read FieldDescriptor.label, gone in protobuf 7.
    "array-record>=0.8.6",  # TFDS writes the code data set as array_record.
    "tensorboard>=2.21.0",
    # epath.Path.absolute(); gcsfs for gs:// workdirs and TensorBoard files, which TF's gfile served
    # before.
    "etils[epath,epath-gcs]>=1.15.0",
    "scipy>=1.17.1",  # Frechet distance (sqrtm).
    "absl-py>=2.5.1",
    "numpy>=2.4.6",
    "pillow>=13.0.0",
    "tqdm>=4.70.1",
    # The parameter table and held-out averages; its parameter_overview and metrics import no
    # TensorFlow (its metric writers do, so npp_jax.summaries writes TensorBoard files itself).
    "clu>=0.0.12",
    # Tokenizing captions with a T5 folder's spiece.model (text-to-image prompts, extraction): a
    # small wheel on every platform the base runs on, so text paths fail on bad input, never on a
    # missing package (a `text` extra would turn a sampling run's first prompt into an ImportError).
    "sentencepiece>=0.2.3",
  ],
  extras_require={
    # Only the PyTorch <-> JAX checkpoint converter (and its parity tests) need torch.
    "torch": ["torch>=2.4"],
    "test": [
      "chex>=0.1.92",
      "pytest>=9.2.0",
      "pytest-xdist>=3.8.0",
      "pytest-timeout>=2.4.0",
      "nbclient>=0.11.0",
      "nbformat>=5.11.1",
      "ipykernel>=7.4.0",
      "torch>=2.4",
      "pytorch-fid>=0.3.0",  # The FID Inception parity tests build pytorch-fid's own modules.
      # tests/test_gcs.py serves gs:// on loopback (the oldest release tried; older ones untested).
      "gcp-storage-emulator>=2026.7.19",
      # T5 parity (tests/test_t5.py): PyTorch T5EncoderModel and T5Tokenizer, folders written by
      # save_pretrained. Base transformers only (no TensorFlow or Flax extras); v5's T5Tokenizer.
      "transformers>=5.25.0",
      "safetensors>=0.8.0",
      "ruff>=0.17.6",  # tests/test_style.py: the format and lint check CI runs (ruff.toml).
      # --mode=compile compiles for TPU slices on any machine (jax.experimental.topologies); jax
      # 0.10.2's own `tpu` extra pins 0.0.42.*. Wheels: Linux x86_64 only (elsewhere those tests
      # skip).
      'libtpu~=0.0.42.1; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
  },
)
