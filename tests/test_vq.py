"""The Flax VQ tokenizer against the PyTorch reference (support/torch_reference.py) with random
weights.

Tolerances: codes must be identical; images agree within 1e-4 relative L2 error (fp32 on CPU).
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from support import torch_reference as ref  # noqa: E402

from npp_jax import config_lib  # noqa: E402
from npp_jax import convert  # noqa: E402
from npp_jax.models import vq  # noqa: E402

REL_TOL = 1e-4


def small_vq_config(**kw):
  v = config_lib.vq_config()
  v.ch, v.ch_mult, v.num_res_blocks, v.z_channels = 32, (1, 2), 2, 32
  v.codebook_size, v.codebook_embed_dim, v.image_size = 64, 8, 16
  for key, value in kw.items():
    v[key] = value
  return v


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def to_nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def to_nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def setup():
  v = small_vq_config()
  torch.manual_seed(0)
  model = ref.VQModel(
    v.codebook_size,
    v.codebook_embed_dim,
    v.z_channels,
    v.ch,
    v.ch_mult,
    v.num_res_blocks,
    v.norm_groups,
  )
  ref.randomize_(model, seed=0).eval()
  state = {k: t.numpy() for k, t in model.state_dict().items()}
  params = convert.state_to_params("vq", state, ml_collections.ConfigDict({"vq": v}))
  images = np.asarray(jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), jnp.float32, -1.0, 1.0))
  return v, vq.VQConfig.from_config(v), model, params, images


def test_encode_matches_reference(setup):
  _, cfg, model, params, images = setup
  codes = vq.encode_fn(params, images, cfg)
  chex.assert_shape(codes, (4, 8, 8))
  chex.assert_type(codes, jnp.int32)
  with torch.no_grad():
    ref_codes, _ = model.encode(to_nchw(images))
  np.testing.assert_array_equal(np.asarray(codes), ref_codes.numpy())
  # Random weights must spread the codes, or the comparison above would prove little.
  assert len(np.unique(np.asarray(codes))) > 10


def test_decode_matches_reference(setup):
  _, cfg, model, params, _ = setup
  codes = np.asarray(
    jax.random.randint(jax.random.key(2), (3, 8, 8), 0, cfg.codebook_size), np.int32
  )
  out = vq.decode_fn(params, codes, cfg)
  chex.assert_shape(out, (3, 16, 16, 3))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  with torch.no_grad():
    want = to_nhwc(model.decode_codes(torch.from_numpy(codes.copy()).long()))
  assert rel_err(out, want) <= REL_TOL


def test_training_forward(setup):
  """Reconstruction through the straight-through path, losses as in the release, gradients to the
  encoder."""
  v, cfg, model, params, images = setup
  vq_model = vq.VQModel(cfg)
  recon, codes, losses = vq_model.apply({"params": params}, images, train=True)
  chex.assert_shape(recon, images.shape)
  with torch.no_grad():
    x = to_nchw(images)
    z = torch.nn.functional.normalize(model.quant_conv(model.encoder(x)), dim=1)
    ref_codes, z_q = model.encode(x)
    want_recon = to_nhwc(model.decoder(model.post_quant_conv(z_q)))
    mse = float(((z_q - z) ** 2).mean())
  np.testing.assert_array_equal(np.asarray(codes), ref_codes.numpy())
  assert rel_err(recon, want_recon) <= REL_TOL
  np.testing.assert_allclose(losses["codebook"], v.codebook_weight * mse, rtol=1e-4)
  np.testing.assert_allclose(losses["commitment"], v.commit_beta * mse, rtol=1e-4)
  np.testing.assert_allclose(
    losses["quantizer"], (v.codebook_weight + v.commit_beta) * mse, rtol=1e-4
  )

  def loss_fn(p):
    recon, _, losses = vq_model.apply({"params": p}, images, train=True)
    return jnp.mean((recon - images) ** 2) + losses["quantizer"]

  grads = jax.grad(loss_fn)(params)
  chex.assert_tree_all_finite(grads)
  # The reconstruction reaches the encoder only through the straight-through estimator.
  assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["quantize"]["embedding"]).sum()) > 0


def test_entropy_loss_matches_numpy():
  affinity = np.asarray(jax.random.normal(jax.random.key(3), (12, 16)), np.float64)
  t = 0.5
  logits = affinity / t
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  shifted = logits + 1e-5
  log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  avg = probs.mean(0)
  want = -(probs * log_probs).sum(1).mean() + (avg * np.log(avg + 1e-5)).sum()
  got = vq.entropy_loss(jnp.asarray(affinity, jnp.float32), t)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_batch_gives_same_codes(setup, axis_type):
  _, cfg, _, params, images = setup
  batch = np.concatenate([images, images[::-1]])  # 8 images, one per fake device.
  mesh = jax.make_mesh((8,), ("data",), (axis_type,))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  codes = vq.encode_fn(params, sharded, cfg)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(vq.encode_fn(params, batch, cfg)))
  images_out = vq.decode_fn(params, codes, cfg)
  assert rel_err(images_out, vq.decode_fn(params, np.asarray(codes), cfg)) <= REL_TOL


def test_vq16_architecture_matches_release_layout():
  """The real VQ-16: every key and shape of the reference built on the meta device (no memory)."""
  v = config_lib.vq_config()
  shapes = vq.param_shapes(v)
  with torch.device("meta"):
    model = ref.VQModel()
  want = {k: tuple(t.shape) for k, t in model.state_dict().items() if k != "quantize.codebook_used"}
  got = {convert.torch_name(p): convert._torch_shape(p, s) for p, s in shapes.items()}
  assert got == want
  # LlamaGen reports 72M parameters for VQ-16.
  assert (
    vq.count_params(vq.VQConfig.from_config(v))
    == sum(np.prod(s) for s in want.values())
    == 71_883_403
  )
  cfg = vq.VQConfig.from_config(v)
  assert cfg.grid == (16, 16)
  out = jax.eval_shape(
    lambda p, x: vq.VQModel(cfg).apply({"params": p}, x, method=vq.VQModel.encode),
    vq.abstract_params(cfg),
    jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32),
  )
  chex.assert_shape(out[0], (2, 16, 16))
  chex.assert_shape(out[1], (2, 16, 16, 8))


def test_bad_inputs_raise(setup):
  _, cfg, _, params, images = setup
  with pytest.raises(ValueError, match="images of shape"):
    vq.encode_fn(params, images[:, :15], cfg)
  with pytest.raises(ValueError, match="codes of shape"):
    vq.decode_fn(params, np.ones((8, 8), np.int32), cfg)
  with pytest.raises(ValueError, match="norm_groups"):
    vq.VQConfig.from_config(small_vq_config(ch=24))
  with pytest.raises(ValueError, match="vq.dtype"):
    vq.VQConfig.from_config(small_vq_config(dtype="float64"))
