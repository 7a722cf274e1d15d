"""The shared AdamW's weight-decay mask: by name, the same with and without scanned layers, and what
the release decays (its rule: >= 2-D weights of the unscanned model)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from support.configs import tiny_model_config

from npp_jax import config_lib
from npp_jax import optim
from npp_jax.models import gpt
from npp_jax.models import vq


def _gpt_params(scan: bool):
  cfg = dataclasses.replace(gpt.GPTConfig.from_config(tiny_model_config()), scan_layers=scan)
  return cfg, gpt.abstract_params(cfg)  # Names and ranks are all the mask reads: no compile.


def test_gpt_mask_is_the_release_rule_and_survives_scan_layers():
  cfg, unscanned = _gpt_params(scan=False)
  _, scanned = _gpt_params(scan=True)
  flat = nn.unbox(unscanned)
  release = jax.tree.map(lambda p: p.ndim >= 2, flat)
  assert optim.decay_mask(flat) == release
  # Stacked [n_layer, ...] scales pass a rank test; the name-based mask keeps them out, so the
  # scanned model's mask equals the unscanned one's, layer for layer.
  scanned_mask = optim.decay_mask(nn.unbox(scanned))
  assert scanned_mask["layers"]["attention_norm"]["scale"] is False
  stacked_release = gpt.stack_layers(jax.tree.map(np.asarray, release), cfg.n_layer)
  assert jax.tree.map(lambda m: bool(np.all(m)), stacked_release) == scanned_mask
  # Boxed (logically partitioned) trees, as the trainer builds its state, give the same mask.
  assert nn.unbox(optim.decay_mask(scanned)) == scanned_mask


def test_vq_mask_is_the_release_rule():
  v = config_lib.vq_config()
  v.ch, v.ch_mult, v.num_res_blocks, v.z_channels = (
    32,
    (1, 2),
    1,
    32,
  )  # Small: every kind of layer kept.
  v.codebook_size, v.codebook_embed_dim, v.image_size = 64, 8, 16
  cfg = vq.VQConfig.from_config(v)
  params = vq.abstract_params(cfg)  # Shapes are all the mask reads: no init to compile.
  assert optim.decay_mask(params) == jax.tree.map(lambda p: p.ndim >= 2, params)


def test_adamw_decays_only_masked_leaves():
  params = {"w": {"kernel": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones((2, 2))}}
  tx = optim.adamw(0.1, b1=0.9, b2=0.95, weight_decay=0.5, grad_clip=1.0)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # Zero gradients: Adam's step is 0, so only decoupled decay moves a weight: w <- w (1 - lr wd).
  np.testing.assert_allclose(new["w"]["kernel"], 1.0 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new["norm"]["scale"], 1.0)
