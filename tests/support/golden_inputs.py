"""The fixed inputs behind tests/data/golden.npz (see make_golden.py); shared with
tests/test_golden.py."""

import jax
import jax.numpy as jnp
import numpy as np

from npp_jax import config_lib
from npp_jax import convert as convert_lib
from npp_jax import npp
from npp_jax import sampling as sample_lib
from npp_jax.models import gpt
from npp_jax.models import vq
from support.configs import tiny_model_config
from support.weights import random_params

# Sampler settings that cover every branch of the decoder: plain, guided with an interval, top-k,
# top-p.
SAMPLER_CASES = {
  "plain": dict(cfg_scale=1.0),
  "cfg": dict(cfg_scale=2.0, cfg_interval=3, temperature=0.9),
  "topk": dict(cfg_scale=1.5, top_k=5),
  "topp": dict(cfg_scale=1.0, top_p=0.8, temperature=1.1),
}


def gpt_model_config():
  return tiny_model_config(grid=(4, 4), n_kv_head=2)


def tiny_gpt():
  cfg = gpt.GPTConfig.from_config(gpt_model_config())
  model, params = random_params(cfg, seed=7)
  return cfg, model, params


def sample(cfg, params, mesh=None, **kw):
  """Codes of the fixed labels; kw are SamplingSettings fields."""
  labels = np.array([0, 3, 9, 1, 4, 4, 7, 2], np.int32)
  settings = sample_lib.SamplingSettings(**kw)
  return sample_lib.sample_codes(
    params, labels, jax.random.key(11), model=cfg, settings=settings, first_index=5, mesh=mesh
  )


def loss_batch(cfg):
  """The fixed (codes [3, h, w], labels [3]) the losses are computed on."""
  rng = np.random.default_rng(3)
  codes = rng.integers(0, cfg.vocab_size, (3, *cfg.grid)).astype(np.int32)
  return codes, np.array([2, 5, 8], np.int32)


def losses(cfg, model, params):
  """The NPP patch loss at k = 1, 2, 4 on a fixed batch (a 4x4 grid), from the model's patch
  logits."""
  codes, labels = loss_batch(cfg)
  out = {}
  for k in (1, 2, 4):
    logits = model.apply({"params": params}, jnp.asarray(codes), jnp.asarray(labels), patch_size=k)
    targets = npp.group_targets(jnp.asarray(codes), k)
    out[f"k{k}"] = np.asarray(npp.patch_loss(logits, targets), np.float64)
  out["logits"] = np.asarray(
    model.apply({"params": params}, jnp.asarray(codes), jnp.asarray(labels))
  )
  return out


def convert_config():
  c = config_lib.base_config()
  c.model = gpt_model_config()
  c.vq.ch, c.vq.ch_mult, c.vq.num_res_blocks = 16, (1, 2), 1
  c.vq.z_channels, c.vq.norm_groups = 16, 4
  c.vq.codebook_size, c.vq.codebook_embed_dim = 64, 8
  c.vq.image_size = 16
  return c


def torch_states():
  """Random state dicts in the release's torch layout, for both kinds (numpy, fp32)."""
  rng = np.random.default_rng(5)
  out = []
  for kind in ("gpt", "vq"):
    shapes = convert_lib.expected_shapes(kind, convert_config())
    state = {
      convert_lib.torch_name(p): rng.standard_normal(convert_lib._torch_shape(p, s)).astype(
        np.float32
      )
      for p, s in shapes.items()
    }
    out.append(state)
  return out


def convert(kind, state):
  return convert_lib.state_to_params(kind, state, convert_config())


def vq_roundtrip(vq_state):
  c = convert_config()
  cfg = vq.VQConfig.from_config(c.vq)
  params = convert_lib.state_to_params("vq", vq_state, c)
  images = np.random.default_rng(9).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  codes = vq.encode_fn(params, jnp.asarray(images), cfg)
  decoded = vq.decode_fn(params, codes, cfg)
  return np.asarray(codes), np.asarray(decoded)
