"""The PyTorch -> JAX converter's tests: release checkpoints saved in each of their forms
(save_form), the converter's command line run in this process (run_convert), and comparisons."""

import argparse

import numpy as np

from npp_jax import convert


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def load_config(path):
  namespace = {}
  exec(compile(open(path).read(), path, "exec"), namespace)  # The same file the CLI reads.
  return namespace["get_config"]()


def save_form(path, state, form, other=None):
  """A state dict saved the way one of the releases saves it."""
  import torch  # Only the converter's tests have it (they skip without).

  if form == "bare":
    obj = state
  elif form == "ddp":  # Keys still carrying the DDP wrapper's prefix.
    obj = {"model": {f"module.{k}": v for k, v in state.items()}}
  elif form == "ema":
    obj = {"model": other, "ema": state, "steps": 10}
  else:
    # Training scripts store their argparse arguments too; weights_only loading must accept them.
    obj = {form: state, "steps": 10, "args": argparse.Namespace(lr=1e-4, gpt_model="GPT-B")}
  torch.save(obj, path)
  return str(path)


def run_convert(*args):
  """`python -m npp_jax.convert args...`, in this process (its errors raise here)."""
  convert.run(["convert", *args])


def flat_np(tree):
  return {k: np.asarray(v) for k, v in convert._flatten(tree).items()}
