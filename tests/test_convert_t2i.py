"""LlamaGen's text-to-image checkpoints through `npp_jax.convert`, against the PyTorch reference's
t2i model (support/torch_reference.py, written from NPP.md): a tiny text model's logits and patch
losses with padded captions and null rows, the round trip, a GPT-B t2i state dict with
configs/t2i.py:B, the t2i VQ-16 with configs/t2i.py:XL, and a class checkpoint for a text config
(and the reverse) in one line.

Tolerances as tests/test_convert.py: logits and losses within 1e-4 relative (fp32, CPU); round trips
bit-exact.
"""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from support import torch_reference as ref  # noqa: E402
from support.conversion import flat_np  # noqa: E402
from support.conversion import load_config  # noqa: E402
from support.conversion import rel_err  # noqa: E402
from support.conversion import run_convert  # noqa: E402
from support.conversion import save_form  # noqa: E402

from npp_jax import checkpoints  # noqa: E402
from npp_jax import config_lib  # noqa: E402
from npp_jax import convert  # noqa: E402
from npp_jax import npp  # noqa: E402
from npp_jax.models import gpt  # noqa: E402

REL_TOL = 1e-4

TEXT_CONFIG = """
from npp_jax import config_lib


def get_config():
  c = config_lib.base_config()
  m = c.model
  m.name = "custom"
  m.n_layer, m.n_head, m.dim, m.n_kv_head = 2, 4, 32, 2
  m.vocab_size, m.grid = 64, (8, 8)
  m.condition, m.cls_token_num, m.caption_dim = "text", 6, 12
  m.multiple_of = 32
  m.dtype = "float32"
  return c
"""


def make_text_gpt(m, seed):
  torch.manual_seed(seed)  # The null caption buffer is drawn at construction.
  model = ref.GPT(
    m.n_layer,
    m.n_head,
    m.dim,
    m.vocab_size,
    m.num_classes,
    m.grid,
    n_kv_head=m.n_kv_head,
    multiple_of=m.multiple_of,
    condition="text",
    caption_dim=m.caption_dim,
    cls_token_num=m.cls_token_num,
  )
  return ref.randomize_(model, seed).eval()


@pytest.fixture(scope="module")
def t2i_setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("t2i")
  config_path = tmp / "text.py"
  config_path.write_text(TEXT_CONFIG)
  config = load_config(str(config_path))
  model = make_text_gpt(config.model, seed=0)
  src = save_form(tmp / "t2i.pt", model.state_dict(), "model")
  run_convert("--kind=gpt", f"--src={src}", f"--config={config_path}", f"--dst={tmp / 'jax'}")
  return config, str(config_path), model, checkpoints.read_params(str(tmp / "jax")), tmp


def test_t2i_logits_and_patch_losses_match_reference(t2i_setup):
  config, _, model, params, _ = t2i_setup
  m = config.model
  flax_model = gpt.GPT(gpt.GPTConfig.from_config(m))
  h, w = m.grid
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, m.vocab_size, size=(3, h, w)).astype(np.int32)
  # Left-padded captions of 2, 6 and 4 tokens (zeros before them, as the data layout).
  valid = np.arange(6)[None, :] >= 6 - np.array([2, 6, 4])[:, None]
  caption = rng.normal(size=(3, 6, m.caption_dim)).astype(np.float32) * valid[..., None]
  null = np.array([False, False, True])  # The last row guided by the null caption, its mask kept.
  t_args = (
    torch.from_numpy(tokens.reshape(3, h * w).astype(np.int64)),
    torch.from_numpy(caption),
  )
  for k in (1, 2, 4):
    logits = flax_model.apply(
      {"params": params}, tokens, caption, caption_mask=valid, null_caption=null, patch_size=k
    )
    chex.assert_shape(logits, (3, (h // k) * (w // k), m.vocab_size))
    t_kw = dict(valid=torch.from_numpy(valid), drop=torch.from_numpy(null))
    with torch.no_grad():
      want = model(*t_args, k, **t_kw).numpy()
      want_loss = float(model.patch_loss(*t_args, k, **t_kw))
    assert rel_err(logits, want) <= REL_TOL, k
    loss = float(npp.patch_loss(logits, npp.group_targets(jnp.asarray(tokens), k)))
    assert abs(loss - want_loss) <= REL_TOL * abs(want_loss), (k, loss, want_loss)


def test_t2i_round_trip_through_torch(t2i_setup, tmp_path):
  config, config_path, model, params, tmp = t2i_setup
  pt = tmp_path / "back.pt"
  run_convert(
    "--kind=gpt", f"--src={tmp / 'jax'}", f"--config={config_path}", f"--dst={pt}", "--to=torch"
  )
  state = torch.load(pt, weights_only=True)["model"]
  fresh = make_text_gpt(config.model, seed=5)
  fresh.load_state_dict(state, strict=True)  # The null caption buffer included.
  for key, value in model.state_dict().items():
    assert torch.equal(fresh.state_dict()[key], value), key
  np.testing.assert_array_equal(
    params["cls_embedding"]["uncond_embedding"], model.cls_embedding.uncond_embedding.numpy()
  )


def test_gpt_b_t2i_state_dict_converts_both_ways_with_the_t2i_config(tmp_path):
  """configs/t2i.py:B against a full-size GPT-B t2i state dict of LlamaGen's layout (112.5M)."""
  config = config_lib.load("configs/t2i.py:B")
  m = config.model
  assert (m.cls_token_num, m.caption_dim, tuple(m.grid)) == (120, 2048, (16, 16))
  torch.manual_seed(0)
  model = ref.GPT(12, 12, 768, 16384, 1000, (16, 16), condition="text", cls_token_num=120)
  state = model.state_dict()
  assert tuple(state["cls_embedding.cap_proj.fc1.weight"].shape) == (768, 2048)
  assert tuple(state["cls_embedding.uncond_embedding"].shape) == (120, 2048)
  src = save_form(tmp_path / "t2i_B_256.pt", state, "model")
  run_convert(
    "--kind=gpt", f"--src={src}", "--config=configs/t2i.py:B", f"--dst={tmp_path / 'jax'}"
  )
  params = checkpoints.read_params(str(tmp_path / "jax"))
  assert checkpoints.param_shapes_of(params) == gpt.param_shapes(m)
  fc1 = state["cls_embedding.cap_proj.fc1.weight"].numpy()
  np.testing.assert_array_equal(params["cls_embedding"]["cap_proj"]["fc1"]["kernel"], fc1.T)
  pt = tmp_path / "back.pt"
  run_convert(
    "--kind=gpt",
    f"--src={tmp_path / 'jax'}",
    "--config=configs/t2i.py:B",
    f"--dst={pt}",
    "--to=torch",
  )
  back = torch.load(pt, weights_only=True)["model"]
  model.load_state_dict(back, strict=True)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    assert torch.equal(back[key], value), key


def test_t2i_vq_is_a_vq16(tmp_path):
  """vq_ds16_t2i.pt has the class VQ-16's architecture: configs/t2i.py:XL's config.vq takes it."""
  config = config_lib.load("configs/t2i.py:XL")
  torch.manual_seed(0)
  model = ref.VQModel()  # LlamaGen's VQ-16 sizes.
  state = model.state_dict()
  src = save_form(tmp_path / "vq_ds16_t2i.pt", state, "model")
  run_convert(
    "--kind=vq", f"--src={src}", "--config=configs/t2i.py:XL", f"--dst={tmp_path / 'jax'}"
  )
  params = checkpoints.read_params(str(tmp_path / "jax"))
  want = convert.state_to_params(
    "vq", {k: v.numpy() for k, v in state.items()}, config, what="the t2i VQ"
  )
  chex.assert_trees_all_equal(flat_np(params), flat_np(want))
  assert params["quantize"]["embedding"].shape == (16384, 8)


def test_class_checkpoint_for_a_text_config_and_the_reverse(t2i_setup, tmp_path):
  config, config_path, text_model, _, tmp = t2i_setup
  m = config.model
  class_model = ref.GPT(
    m.n_layer, m.n_head, m.dim, m.vocab_size, 10, m.grid, n_kv_head=2, multiple_of=32
  )
  src = save_form(tmp_path / "c2i.pt", class_model.state_dict(), "model")
  dst = tmp_path / "jax"
  with pytest.raises(ValueError) as info:
    run_convert("--kind=gpt", f"--src={src}", f"--config={config_path}", f"--dst={dst}")
  msg = str(info.value)
  assert "holds a class-conditioned GPT (cls_embedding.embedding_table.weight)" in msg, msg
  assert "model.condition='text'" in msg and "\n" not in msg
  class_config = tmp_path / "class.py"
  class_config.write_text(TEXT_CONFIG.replace('"text", 6, 12', '"class", 1, 12'))
  with pytest.raises(ValueError, match=r"holds a text-conditioned GPT \(cls_embedding.cap_proj"):
    run_convert("--kind=gpt", f"--src={tmp / 't2i.pt'}", f"--config={class_config}", f"--dst={dst}")
  with pytest.raises(ValueError, match="holds a text-conditioned GPT"):  # --to=torch too.
    run_convert(
      "--kind=gpt",
      f"--src={tmp / 'jax'}",
      f"--config={class_config}",
      f"--dst={dst}.pt",
      "--to=torch",
    )
  # Another caption width: the mis-shaped weights named, with the shapes the config expects.
  wide = tmp_path / "wide.py"
  wide.write_text(TEXT_CONFIG.replace('"text", 6, 12', '"text", 6, 16'))
  with pytest.raises(
    ValueError, match=r"cls_embedding.cap_proj.fc1.weight \[32, 12\] \(expected \[32, 16\]\)"
  ):
    run_convert("--kind=gpt", f"--src={tmp / 't2i.pt'}", f"--config={wide}", f"--dst={dst}")
  assert not dst.exists() and not (tmp_path / "jax.pt").exists()
