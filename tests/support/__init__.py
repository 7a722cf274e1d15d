"""What the test files share, in one place, so that no test module imports another.

tests/ is on sys.path under pytest (tests/ has no __init__.py: pytest's default import mode puts the
folder of conftest.py and of each test file first on sys.path), so the test files import this
package as `support`: `from support import cli`, `from support.paths import ROOT`.

- paths: ROOT (the checkout) and TESTS (this folder's parent).
- cli: the command-line runner (`python -m npp_jax.main` and the other CLIs as subprocesses),
  free_port and the environment of multi-process runs.
- codes: the code data sets the trainers read (make_codes, write_codes, the `dataset` fixture) and
  read_split for the ones extraction writes.
- configs: tiny GPT and VQ configs; weights: random weights (GPT, VQ, the FID Inception).
- images: image folders (write_image, make_split_folder) and NO_TENSORFLOW for child interpreters.
- conversion: the PyTorch -> JAX converter's helpers (save_form, run_convert, flat_np, rel_err).
- launch_stubs: stub gcloud / sbatch / srun / scontrol / python for the launcher scripts.
- scalars: TensorBoard scalars a run wrote.
- t5_files: a sentencepiece model and a random T5 encoder (no download).
- torch_reference: the PyTorch reference of the released GPT and VQ.
- fake_gcs, gcs_emulator: `gs://` served locally (gcs_emulator is also run as a script).
- golden_inputs, make_golden: the inputs of tests/data/golden.npz and the script that wrote it.
"""
