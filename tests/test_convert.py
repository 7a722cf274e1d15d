"""The checkpoint converter, end to end through its command line, against the PyTorch reference.

The reference (support/torch_reference.py) is saved in every form the releases use, converted with
`convert.run`, loaded with `checkpoints.read_params`, and run in Flax. Tolerances (fp32, CPU): GPT
logits and patch losses within 1e-4 relative; VQ codes identical and images within 1e-4 relative;
round trips JAX -> torch -> JAX bit-exact.
"""

import os

import chex
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from support import torch_reference as ref  # noqa: E402
from support.cli import run_main  # noqa: E402
from support.conversion import flat_np  # noqa: E402
from support.conversion import load_config  # noqa: E402
from support.conversion import rel_err  # noqa: E402
from support.conversion import run_convert  # noqa: E402
from support.conversion import save_form  # noqa: E402
from support.paths import ROOT  # noqa: E402

from npp_jax import checkpoints  # noqa: E402
from npp_jax import convert  # noqa: E402
from npp_jax import npp  # noqa: E402
from npp_jax.models import gpt  # noqa: E402
from npp_jax.models import vq  # noqa: E402

REL_TOL = 1e-4

CONFIG_FILE = """
from npp_jax import config_lib


def get_config():
  c = config_lib.base_config()
  m = c.model
  m.name = "custom"
  m.n_layer, m.n_head, m.dim, m.n_kv_head = 2, 4, 32, {n_kv_head}
  m.vocab_size, m.num_classes, m.grid = 64, 10, (8, 8)
  m.multiple_of = 32
  m.dtype = "float32"
  c.vq = config_lib.vq_config()
  v = c.vq
  v.ch, v.ch_mult, v.num_res_blocks, v.z_channels = 32, (1, 2), 1, 32
  v.codebook_size, v.codebook_embed_dim, v.image_size = 64, 8, 16
  return c
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("configs") / "tiny.py"
  path.write_text(
    CONFIG_FILE.format(n_kv_head=2)
  )  # Fewer KV heads than query heads: GQA is mapped too.
  return str(path)


def make_gpt(config, seed):
  m = config.model
  model = ref.GPT(
    m.n_layer,
    m.n_head,
    m.dim,
    m.vocab_size,
    m.num_classes,
    m.grid,
    n_kv_head=m.n_kv_head,
    multiple_of=m.multiple_of,
  )
  return ref.randomize_(model, seed).eval()


def make_vq(config, seed):
  v = config.vq
  model = ref.VQModel(
    v.codebook_size,
    v.codebook_embed_dim,
    v.z_channels,
    v.ch,
    v.ch_mult,
    v.num_res_blocks,
    v.norm_groups,
  )
  return ref.randomize_(model, seed).eval()


@pytest.fixture(scope="module")
def gpt_setup(config_path, tmp_path_factory):
  config = load_config(config_path)
  model = make_gpt(config, seed=0)
  # The release zero-initialises the output layer; a random one is what proves its mapping.
  assert float(model.output.weight.detach().abs().sum()) > 0
  tmp = tmp_path_factory.mktemp("gpt")
  src = save_form(tmp / "ckpt.pt", model.state_dict(), "model")
  run_convert("--kind=gpt", f"--src={src}", f"--config={config_path}", f"--dst={tmp / 'jax'}")
  return config, model, checkpoints.read_params(str(tmp / "jax")), tmp


@pytest.fixture(scope="module")
def vq_setup(config_path, tmp_path_factory):
  config = load_config(config_path)
  model = make_vq(config, seed=1)
  tmp = tmp_path_factory.mktemp("vq")
  src = save_form(tmp / "vq.pt", model.state_dict(), "model")
  run_convert("--kind=vq", f"--src={src}", f"--config={config_path}", f"--dst={tmp / 'jax'}")
  return config, model, checkpoints.read_params(str(tmp / "jax")), tmp


# ---------------------------------------------------------------------------------------------- GPT


def test_gpt_logits_and_patch_losses_match_reference(gpt_setup):
  config, model, params, _ = gpt_setup
  flax_model = gpt.GPT(gpt.GPTConfig.from_config(config.model))
  h, w = config.model.grid
  tokens = jax.random.randint(jax.random.key(0), (3, h, w), 0, config.model.vocab_size, jnp.int32)
  labels = jnp.array([0, 7, config.model.num_classes], jnp.int32)  # The null class row too.
  t_tokens = torch.from_numpy(np.asarray(tokens).reshape(3, h * w).astype(np.int64))
  t_labels = torch.from_numpy(np.asarray(labels).astype(np.int64))
  for k in (1, 2, 4):
    logits = flax_model.apply({"params": params}, tokens, labels, patch_size=k, train=False)
    chex.assert_shape(logits, (3, (h // k) * (w // k), config.model.vocab_size))
    chex.assert_type(logits, jnp.float32)
    with torch.no_grad():
      want_logits = model(t_tokens, t_labels, k).numpy()
      want_loss = float(model.patch_loss(t_tokens, t_labels, k))
    assert rel_err(logits, want_logits) <= REL_TOL, k
    loss = npp.patch_loss(logits, npp.group_targets(tokens, k))
    assert abs(float(loss) - want_loss) <= REL_TOL * abs(want_loss), (k, float(loss), want_loss)


@pytest.mark.parametrize("form", ["module", "state_dict", "bare", "ddp", "ema"])
def test_gpt_every_checkpoint_form(gpt_setup, config_path, tmp_path, form):
  config, model, params, _ = gpt_setup
  other = {
    k: v + 1.0 for k, v in model.state_dict().items()
  }  # Distinct "model" weights next to "ema".
  src = save_form(tmp_path / "ckpt.pt", model.state_dict(), form, other)
  ema = ["--ema"] if form == "ema" else []
  run_convert(
    "--kind=gpt", f"--src={src}", f"--config={config_path}", f"--dst={tmp_path / 'jax'}", *ema
  )
  chex.assert_trees_all_equal(
    flat_np(checkpoints.read_params(str(tmp_path / "jax"))), flat_np(params)
  )
  if form == "ema":  # Without --ema the same file gives the "model" weights.
    run_convert(
      "--kind=gpt", f"--src={src}", f"--config={config_path}", f"--dst={tmp_path / 'jax_model'}"
    )
    got = checkpoints.read_params(str(tmp_path / "jax_model"))
    np.testing.assert_array_equal(got["norm"]["scale"], np.asarray(params["norm"]["scale"]) + 1.0)


def test_gpt_round_trip_through_torch(gpt_setup, config_path, tmp_path):
  config, model, params, tmp = gpt_setup
  pt = tmp_path / "back.pt"
  run_convert(
    "--kind=gpt", f"--src={tmp / 'jax'}", f"--config={config_path}", f"--dst={pt}", "--to=torch"
  )
  # The PyTorch side loads it with strict key matching, as the release does.
  fresh = make_gpt(config, seed=5)
  fresh.load_state_dict(torch.load(pt, weights_only=True)["model"], strict=True)
  for key, value in model.state_dict().items():
    assert torch.equal(fresh.state_dict()[key], value), key
  run_convert("--kind=gpt", f"--src={pt}", f"--config={config_path}", f"--dst={tmp_path / 'again'}")
  chex.assert_trees_all_equal(
    flat_np(checkpoints.read_params(str(tmp_path / "again"))), flat_np(params)
  )


def test_load_params_into_a_sharded_target(gpt_setup):
  _, _, params, tmp = gpt_setup
  mesh = jax.make_mesh((8,), ("data",), (AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params
  )
  got = checkpoints.read_params(str(tmp / "jax"), target)
  for leaf in jax.tree.leaves(got):
    assert isinstance(leaf, jax.Array) and leaf.sharding == replicated
  chex.assert_trees_all_equal(flat_np(got), flat_np(params))


def test_gpt_scanned_params_export_like_unscanned(gpt_setup, config_path):
  config, _, params, _ = gpt_setup
  stacked = gpt.stack_layers(dict(params), config.model.n_layer)
  assert "layers" in stacked
  want = convert.params_to_state("gpt", params, config)
  got = convert.params_to_state("gpt", stacked, config)
  chex.assert_trees_all_equal(got, want)


# ----------------------------------------------------------------------------------------------- VQ


def test_vq_codes_and_images_match_reference(vq_setup):
  config, model, params, _ = vq_setup
  cfg = vq.VQConfig.from_config(config.vq)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), jnp.float32, -1.0, 1.0)
  codes = vq.encode_fn(params, images, cfg)
  with torch.no_grad():
    want_codes, _ = model.encode(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()))
    want_images = model.decode_codes(want_codes).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(codes), want_codes.numpy())
  assert rel_err(vq.decode_fn(params, codes, cfg), want_images) <= REL_TOL


@pytest.mark.parametrize("form", ["bare", "ema"])
def test_vq_checkpoint_forms(vq_setup, config_path, tmp_path, form):
  config, model, params, _ = vq_setup
  other = {k: v + 1.0 for k, v in model.state_dict().items()}
  src = save_form(tmp_path / "vq.pt", model.state_dict(), form, other)
  ema = ["--ema"] if form == "ema" else []
  run_convert(
    "--kind=vq", f"--src={src}", f"--config={config_path}", f"--dst={tmp_path / 'jax'}", *ema
  )
  chex.assert_trees_all_equal(
    flat_np(checkpoints.read_params(str(tmp_path / "jax"))), flat_np(params)
  )


def test_vq_round_trip_through_torch(vq_setup, config_path, tmp_path):
  config, model, params, tmp = vq_setup
  pt = tmp_path / "back.pt"
  run_convert(
    "--kind=vq", f"--src={tmp / 'jax'}", f"--config={config_path}", f"--dst={pt}", "--to=torch"
  )
  fresh = make_vq(config, seed=6)
  fresh.load_state_dict(torch.load(pt, weights_only=True)["model"], strict=True)
  for key, value in model.state_dict().items():
    assert torch.equal(fresh.state_dict()[key], value), key
  run_convert("--kind=vq", f"--src={pt}", f"--config={config_path}", f"--dst={tmp_path / 'again'}")
  chex.assert_trees_all_equal(
    flat_np(checkpoints.read_params(str(tmp_path / "again"))), flat_np(params)
  )


# ------------------------------------------------------------------------------------------- Errors


def test_key_and_shape_mismatches_give_one_error(gpt_setup, config_path, tmp_path):
  _, model, _, _ = gpt_setup
  state = dict(model.state_dict())
  del state["layers.1.feed_forward.w3.weight"]
  state["layers.2.attention.wqkv.weight"] = torch.ones(3, 3)
  state["norm.weight"] = torch.ones(31)
  state["layers.0.attention.kv_cache.k_cache"] = torch.ones(2)  # Inference buffers are ignored.
  src = save_form(tmp_path / "bad.pt", state, "model")
  dst = tmp_path / "jax"
  with pytest.raises(ValueError) as info:
    run_convert("--kind=gpt", f"--src={src}", f"--config={config_path}", f"--dst={dst}")
  msg = str(info.value)
  assert "\n" not in msg
  assert "missing 1 keys: layers.1.feed_forward.w3.weight" in msg
  assert "unexpected 1 keys: layers.2.attention.wqkv.weight" in msg
  assert "norm.weight [31] (expected [32])" in msg
  assert "k_cache" not in msg
  assert not dst.exists()


def test_wrong_model_size_is_reported(vq_setup, config_path, tmp_path):
  """A VQ checkpoint read as a GPT: everything missing and unexpected, in one truncated line."""
  _, _, _, tmp = vq_setup
  with pytest.raises(ValueError, match=r"missing \d+ keys: .*\(\+\d+ more\); unexpected \d+ keys"):
    run_convert(
      "--kind=gpt", f"--src={tmp / 'vq.pt'}", f"--config={config_path}", f"--dst={tmp_path / 'x'}"
    )


def test_existing_dst_is_refused(gpt_setup, config_path, tmp_path):
  _, _, _, tmp = gpt_setup
  dst = tmp_path / "exists"
  dst.mkdir()
  (dst / "keep").write_text("untouched")
  with pytest.raises(ValueError, match="already exists"):
    run_convert("--kind=gpt", f"--src={tmp / 'ckpt.pt'}", f"--config={config_path}", f"--dst={dst}")
  pt = tmp_path / "exists.pt"
  pt.write_text("untouched")
  with pytest.raises(ValueError, match="already exists"):
    run_convert(
      "--kind=gpt", f"--src={tmp / 'jax'}", f"--config={config_path}", f"--dst={pt}", "--to=torch"
    )
  assert (dst / "keep").read_text() == "untouched" and pt.read_text() == "untouched"


def test_bad_arguments(gpt_setup, config_path, tmp_path, capsys):
  _, _, _, tmp = gpt_setup
  src = f"--src={tmp / 'ckpt.pt'}"
  with pytest.raises(ValueError, match="no 'ema' state dict"):
    run_convert("--kind=gpt", src, f"--config={config_path}", f"--dst={tmp_path / 'a'}", "--ema")
  with pytest.raises(ValueError, match="kind"):
    run_convert("--kind=vit", src, f"--config={config_path}", f"--dst={tmp_path / 'a'}")
  with pytest.raises(ValueError, match="--config is required"):
    run_convert("--kind=gpt", src, f"--dst={tmp_path / 'a'}")
  with pytest.raises(ValueError, match="no such file"):
    run_convert("--kind=gpt", src, f"--config={tmp_path / 'none.py'}", f"--dst={tmp_path / 'a'}")
  with pytest.raises(ValueError, match="is not a file"):
    run_convert(
      "--kind=gpt",
      f"--src={tmp_path / 'none.pt'}",
      f"--config={config_path}",
      f"--dst={tmp_path / 'a'}",
    )
  # The module's entry point prints one line and exits non-zero instead of a traceback.
  assert convert.main(["convert", "--kind=gpt", src, f"--dst={tmp_path / 'a'}"]) == 2
  assert capsys.readouterr().err.startswith("error: --config is required")
  assert not os.path.exists(tmp_path / "a")


# ----------------------------------------------------------------------------- training workdirs


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A real run of configs/tiny.py on 8 devices, EMA on: checkpoints at steps 2 and 4."""
  from npp_jax.data import code_dataset

  tmp = tmp_path_factory.mktemp("trained")
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 256, (32, 1, 16, 16)).astype(np.int32)
  labels = rng.integers(0, 10, 32).astype(np.int32)
  code_dataset.write_code_dataset(str(tmp / "codes"), codes, labels, vocab_size=256, num_classes=10)
  workdir = str(tmp / "work")
  argv = [
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.data.path={tmp / 'codes'}",
    "--config.train.max_steps=4",
    "--config.train.checkpoint_every_steps=2",
    "--config.optim.ema_decay=0.5",
  ]
  run = run_main(*argv)
  assert run.returncode == 0, run.stderr[-3000:]
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  return config, os.path.join(ROOT, "configs", "tiny.py"), workdir


def _logits_match(config, params, pt):
  """The .pt loads strictly into the release's class and gives the logits `params` give in Flax."""
  model = make_gpt(config, seed=3)
  model.load_state_dict(torch.load(pt, weights_only=True)["model"], strict=True)
  h, w = config.model.grid
  tokens = jax.random.randint(jax.random.key(1), (2, h, w), 0, config.model.vocab_size, jnp.int32)
  labels = jnp.array([3, config.model.num_classes], jnp.int32)
  logits = gpt.GPT(gpt.GPTConfig.from_config(config.model)).apply(
    {"params": params}, tokens, labels, patch_size=2, train=False
  )
  with torch.no_grad():
    want = model(
      torch.from_numpy(np.asarray(tokens).reshape(2, h * w).astype(np.int64)),
      torch.from_numpy(np.asarray(labels).astype(np.int64)),
      2,
    ).numpy()
  assert rel_err(logits, want) <= REL_TOL


def test_a_training_workdir_exports_to_torch_and_params(trained_workdir, tmp_path):
  """`--to=torch --src=WORKDIR`: the latest step, --step=2, --ema, each a .pt the release's class
  loads strictly with the logits of those weights; `--to=params` the same weights as a params
  directory, which exports to the same .pt."""
  config, config_path, workdir = trained_workdir
  ckpts = os.path.join(workdir, "checkpoints")
  args = ("--kind=gpt", f"--src={workdir}", f"--config={config_path}")
  picks = {
    "latest": ((), checkpoints.checkpoint_params(ckpts)),
    "step2": (("--step=2",), checkpoints.checkpoint_params(ckpts, step=2)),
    "ema": (("--ema",), checkpoints.checkpoint_params(ckpts, ema=True)),
  }
  for name, (extra, params) in picks.items():
    run_convert(*args, f"--dst={tmp_path / name}.pt", "--to=torch", *extra)
    _logits_match(config, gpt.unstack_layers(dict(params)), str(tmp_path / f"{name}.pt"))
  # The three are different weights (4 steps of training; the EMA lags): each flag picks its own.
  states = {n: torch.load(tmp_path / f"{n}.pt", weights_only=True)["model"] for n in picks}
  for a, b in (("latest", "step2"), ("latest", "ema"), ("step2", "ema")):
    assert not torch.equal(states[a]["norm.weight"], states[b]["norm.weight"]), (a, b)
  # The same step reached through WORKDIR/checkpoints.
  run_convert(
    "--kind=gpt",
    f"--src={ckpts}",
    f"--config={config_path}",
    "--step=2",
    "--to=torch",
    f"--dst={tmp_path / 'via_ckpts.pt'}",
  )
  again = torch.load(tmp_path / "via_ckpts.pt", weights_only=True)["model"]
  assert all(torch.equal(again[k], v) for k, v in states["step2"].items())

  run_convert(*args, "--ema", "--to=params", f"--dst={tmp_path / 'params'}")
  chex.assert_trees_all_equal(
    flat_np(checkpoints.read_params(str(tmp_path / "params"))),
    flat_np(checkpoints.load_params(workdir, ema=True)),  # What sampling reads from the workdir.
  )
  run_convert(
    "--kind=gpt",
    f"--src={tmp_path / 'params'}",
    f"--config={config_path}",
    "--to=torch",
    f"--dst={tmp_path / 'from_params.pt'}",
  )
  again = torch.load(tmp_path / "from_params.pt", weights_only=True)["model"]
  assert again.keys() == states["ema"].keys()
  assert all(torch.equal(again[k], v) for k, v in states["ema"].items())


def test_workdir_export_refuses_what_does_not_fit(
  trained_workdir, gpt_setup, config_path, tmp_path
):
  """A step the run did not keep, --step or --ema on a params directory, --to=params of a params
  directory, the wrong kind and the wrong config: one line each, nothing written."""
  _, tiny_path, workdir = trained_workdir
  _, _, _, tmp = gpt_setup
  dst = f"--dst={tmp_path / 'out'}"
  cases = [
    (
      ("--kind=gpt", f"--src={workdir}", "--step=3", "--to=torch"),
      r"holds no checkpoint of step 3; expected one of \[2, 4\]",
    ),
    (
      ("--kind=gpt", f"--src={workdir}", "--step=2"),
      r"--step=2; expected a step >= 0 .* with --to",
    ),
    (
      ("--kind=gpt", f"--src={tmp / 'jax'}", "--step=2", "--to=torch"),
      "is a GPT params directory, one set of weights; --step and --ema pick",
    ),
    (
      ("--kind=gpt", f"--src={tmp / 'jax'}", "--ema", "--to=torch"),
      "is a GPT params directory, one set of weights",
    ),
    (
      ("--kind=gpt", f"--src={tmp / 'jax'}", "--to=params"),
      "is a GPT params directory; expected a GPT training workdir or its checkpoints/ folder",
    ),
    (
      ("--kind=vq", f"--src={workdir}", "--to=torch"),
      "is a GPT training workdir; expected a VQ params directory",
    ),
    (("--kind=vq", f"--src={workdir}", "--to=params", "--ema"), "VQ training keeps no EMA"),
  ]
  for argv, match in cases:
    with pytest.raises(ValueError, match=match):
      run_convert(*argv, f"--config={tiny_path}", dst)
  # Another architecture than the run's (test_convert's config): named, nothing written.
  with pytest.raises(ValueError, match="do not fit the config"):
    run_convert("--kind=gpt", f"--src={workdir}", "--to=params", f"--config={config_path}", dst)
  assert not os.path.exists(tmp_path / "out")
