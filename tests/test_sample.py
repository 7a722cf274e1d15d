"""The KV-cache decoder against the full forward pass, the sampler against NumPy and step-by-step
references, data-parallel and sharded sampling on 8 fake devices, the programs an ahead-of-time
compile sees, and the sampling job (codes, images, resume)."""

import dataclasses
import functools
import os
import subprocess

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import configs
from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import run_main
from support.cli import start_main
from support.weights import random_params
from support.weights import random_vq_params

from npp_jax import config_lib
from npp_jax import sampling
from npp_jax import sharding
from npp_jax.jobs import sample
from npp_jax.models import gpt

ATOL = 1e-4  # fp32 cached vs full forward: different summation orders only.
N_CLASSES = 10


def tiny_model_config(**kw):
  return configs.tiny_model_config(**{"num_classes": N_CLASSES, "grid": (4, 4), **kw})


@pytest.fixture(scope="module")
def tiny():
  cfg = gpt.GPTConfig.from_config(tiny_model_config())
  model, params = random_params(cfg)
  full = jax.jit(lambda p, t, l: model.apply({"params": p}, t, l))
  return cfg, params, full


def reference_logits(full, params, codes, labels, cfg, cfg_scale=1.0, cfg_interval=-1):
  """Guided logits [B, n, V] of every position from the full forward pass (teacher forcing)."""
  b = codes.shape[0]
  grid = codes.reshape(b, *cfg.grid)
  cond = np.asarray(full(params, grid, labels), np.float64)
  if cfg_scale <= 1.0:
    return cond
  uncond = np.asarray(full(params, grid, np.full_like(labels, cfg.num_classes)), np.float64)
  guided = uncond + cfg_scale * (cond - uncond)
  t = np.arange(cond.shape[1])
  on = (cfg_interval < 0) | (t <= cfg_interval + 1)
  return np.where(on[None, :, None], guided, cond)


# ------------------------------------------------------------------------------- the cached decoder


@pytest.mark.parametrize("n_kv_head", [None, 2])
@pytest.mark.parametrize("chunk", [1, 5])
def test_cached_decoding_matches_full_forward(n_kv_head, chunk):
  """Teacher tokens through the cache, `chunk` positions per call, against every full-forward
  logit."""
  cfg = gpt.GPTConfig.from_config(tiny_model_config(n_kv_head=n_kv_head, grid=(4, 5)))
  model, params = random_params(cfg)
  b, (h, w) = 3, cfg.grid
  tokens = jax.random.randint(jax.random.key(3), (b, h, w), 0, cfg.vocab_size)
  labels = jnp.array([1, 5, cfg.num_classes])  # The null class decodes like any other.
  want = model.apply({"params": params}, tokens, labels)

  decoder = gpt.Decoder(cfg)
  # The decoder takes a scanned-layout tree once unstacked: same names, same numbers.
  variables = {"params": gpt.unstack_layers(gpt.stack_layers(params, cfg.n_layer))}
  cache = gpt.init_cache(cfg, b, h * w)
  x = jnp.concatenate(
    [
      decoder.apply(variables, labels, method=gpt.Decoder.embed_class),
      decoder.apply(variables, tokens.reshape(b, -1)[:, :-1], method=gpt.Decoder.embed_tokens),
    ],
    axis=1,
  )
  step = jax.jit(lambda v, x, c, pos: decoder.apply(v, x, c, pos))
  got = []
  for pos in range(0, h * w, chunk):
    logits, cache = step(variables, x[:, pos : pos + chunk], cache, pos)
    got.append(logits)
  got = jnp.concatenate(got, axis=1)
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # Every position's values landed in the cache (keys of position 0 are zero: RoPE zeroes the
  # condition).
  assert np.all(np.abs(np.asarray(cache[-1][1])).sum(-1) > 0)


# --------------------------------------------------------------------------------- logit processing


def np_guide(cond, uncond, s):
  return uncond + s * (cond - uncond)


def np_filter(logits, temperature, top_k, top_p):
  """LlamaGen's sample(): logits / temperature, then top_k_top_p_filtering, written out in NumPy."""
  x = np.array(logits, np.float64) / max(temperature, 1e-5)
  if top_k > 0:
    kth = np.sort(x, axis=-1)[:, -top_k][:, None]
    x[x < kth] = -np.inf
  if top_p < 1.0:
    for row in x:
      order = np.argsort(-row, kind="stable")
      p = np.exp(row[order] - row[order][0])
      cum = np.cumsum(p / p.sum())
      remove = cum > top_p
      remove[1:] = remove[:-1].copy()  # Keep the first token that crosses the threshold.
      remove[0] = False
      row[order[remove]] = -np.inf
  return x


def test_guide_matches_numpy():
  cond, uncond = np.random.default_rng(0).normal(size=(2, 4, 50))
  np.testing.assert_allclose(
    sampling.guide(jnp.asarray(cond, jnp.float32), jnp.asarray(uncond, jnp.float32), 2.5),
    np_guide(cond, uncond, 2.5),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize(
  "temperature,top_k,top_p",
  [
    (1.0, 0, 1.0),
    (0.7, 5, 1.0),
    (1.3, 0, 0.8),
    (1.0, 10, 0.5),
    (1.0, 0, 1e-3),
    (2.0, 1, 1.0),
    (1.0, 64, 0.95),
  ],
)
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(1).normal(scale=3.0, size=(6, 64)).astype(np.float32)
  got = np.asarray(
    sampling.filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p)
  )
  want = np_filter(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  kept = np.isfinite(want)
  np.testing.assert_allclose(got[kept], want[kept], rtol=1e-5)
  if top_k and top_p == 1.0:
    assert np.all(kept.sum(-1) == top_k)
  if top_p < 1.0:
    # The smallest set of most likely tokens with mass >= top_p (of the top-k-filtered
    # distribution).
    base = np_filter(logits, temperature, top_k, 1.0)
    probs = np.exp(base - base.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mass = np.where(kept, probs, 0).sum(-1)
    smallest_kept = np.where(kept, probs, np.inf).min(-1)
    assert np.all(mass >= top_p - 1e-6)
    assert np.all(mass - smallest_kept < top_p)


# ------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (3.0, -1), (3.0, 1)])
def test_greedy_equals_stepwise_full_forward_argmax(tiny, cfg_scale, cfg_interval):
  cfg, params, full = tiny
  labels = np.array([0, 4, 9, 2], np.int32)
  settings = sampling.SamplingSettings(cfg_scale=cfg_scale, cfg_interval=cfg_interval, top_k=1)
  kw = dict(model=cfg, settings=settings)
  got = np.asarray(sampling.sample_codes(params, labels, jax.random.key(0), **kw))
  again = np.asarray(sampling.sample_codes(params, labels, jax.random.key(7), **kw))
  np.testing.assert_array_equal(got, again)  # Greedy: no randomness at all.
  n = cfg.grid[0] * cfg.grid[1]
  codes = np.zeros((len(labels), n), np.int32)
  for t in range(n):  # Step by step, the full forward pass over the tokens chosen so far.
    logits = reference_logits(full, params, codes, labels, cfg, cfg_scale, cfg_interval)
    codes[:, t] = logits[:, t].argmax(-1)
  chex.assert_shape(got, (len(labels), *cfg.grid))
  np.testing.assert_array_equal(got.reshape(len(labels), n), codes)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (0.8, 0, 0.6), (1.5, 6, 0.7)])
def test_sampled_tokens_lie_in_the_filtered_set(tiny, temperature, top_k, top_p):
  """Every sampled token survives the NumPy filter of the full forward pass's guided logits."""
  cfg, params, full = tiny
  labels = np.arange(8, dtype=np.int32) % N_CLASSES
  codes = np.asarray(
    sampling.sample_codes(
      params,
      labels,
      jax.random.key(2),
      model=cfg,
      settings=sampling.SamplingSettings(2.0, temperature=temperature, top_k=top_k, top_p=top_p),
    )
  )
  flat = codes.reshape(len(labels), -1)
  logits = reference_logits(full, params, flat, labels, cfg, 2.0)
  for t in range(flat.shape[1]):
    allowed = np.isfinite(np_filter(logits[:, t], temperature, top_k, top_p))
    assert allowed[np.arange(len(labels)), flat[:, t]].all(), f"token {t} outside the filtered set"
  assert len(np.unique(flat)) > 1


def test_sampling_is_reproducible_and_seeded(tiny):
  cfg, params, _ = tiny
  labels = np.array([1, 1, 2, 3], np.int32)
  draw = lambda seed: np.asarray(
    sampling.sample_codes(
      params, labels, jax.random.key(seed), model=cfg, settings=sampling.SamplingSettings(1.5)
    )
  )
  a, b, c = draw(0), draw(0), draw(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])  # Same class, different samples: keys differ per index.


def test_a_sample_depends_on_its_global_index_only(tiny):
  """Batches [0:4] + [4:8] (first_index 0 and 4) give the same samples as one batch of 8."""
  cfg, params, _ = tiny
  labels = np.arange(8, dtype=np.int32)
  kw = dict(model=cfg, settings=sampling.SamplingSettings(2.0, top_k=20, temperature=1.2))
  whole = np.asarray(sampling.sample_codes(params, labels, jax.random.key(5), **kw))
  first = np.asarray(sampling.sample_codes(params, labels[:4], jax.random.key(5), **kw))
  second = np.asarray(
    sampling.sample_codes(params, labels[4:], jax.random.key(5), first_index=4, **kw)
  )
  np.testing.assert_array_equal(whole, np.concatenate([first, second]))


def test_eight_devices_give_the_samples_of_one(tiny):
  cfg, params, _ = tiny
  assert jax.device_count() == 8
  labels = np.arange(16, dtype=np.int32) % N_CLASSES
  kw = dict(model=cfg, settings=sampling.SamplingSettings(2.0, top_p=0.9))
  mesh8 = jax.make_mesh((8,), ("data",))
  mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  got8 = sampling.sample_codes(params, labels, jax.random.key(3), mesh=mesh8, **kw)
  got1 = sampling.sample_codes(params, labels, jax.random.key(3), mesh=mesh1, **kw)
  assert len(got8.sharding.device_set) == 8
  assert got8.sharding.shard_shape(got8.shape)[0] == 2
  np.testing.assert_array_equal(np.asarray(got8), np.asarray(got1))
  # The training mesh layout (data, fsdp, tensor) also splits the batch over all of its devices.
  mesh3 = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  got3 = sampling.sample_codes(params, labels, jax.random.key(3), mesh=mesh3, **kw)
  np.testing.assert_array_equal(np.asarray(got3), np.asarray(got1))


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(temperature=0.0), "sample.temperature=0.0; expected a positive number"),
    (dict(top_p=0.0), "sample.top_p=0.0; expected a number in"),
    (dict(top_p=1.5), "sample.top_p=1.5"),
    (dict(top_k=-1), "sample.top_k=-1; expected an integer >= 0"),
    (dict(top_k=2.5), "sample.top_k=2.5"),
    (dict(cfg_scale=0.5), "sample.cfg_scale=0.5; expected a number >= 1"),
    (dict(cfg_interval=-2), "sample.cfg_interval=-2"),
  ],
)
def test_sampling_settings_refuse_bad_values(kw, match):
  with pytest.raises(ValueError, match=match):
    sampling.SamplingSettings(**kw)


@pytest.mark.parametrize(
  "labels,settings,match",
  [
    ([0, N_CLASSES], {}, "class id 10 out of range"),
    ([-1, 0], {}, "class id -1 out of range"),
    ([[0, 1]], {}, "expected a non-empty vector"),
    ([0, 1], dict(top_k=65), r"sample.top_k=65; expected an integer in \[0, model.vocab_size=64\]"),
  ],
)
def test_sampler_bad_inputs(tiny, monkeypatch, labels, settings, match):
  monkeypatch.setattr(sampling, "_programs", lambda *a: pytest.fail("compiled before the check"))
  cfg, params, _ = tiny
  settings = sampling.SamplingSettings(**settings)
  with pytest.raises(ValueError, match=match):
    sampling.sample_codes(
      params, np.asarray(labels), jax.random.key(0), model=cfg, settings=settings
    )


def test_sampler_batch_must_split_over_the_mesh(tiny):
  cfg, params, _ = tiny
  with pytest.raises(ValueError, match="multiple of 8"):
    sampling.sample_codes(
      params,
      np.zeros(4, np.int32),
      jax.random.key(0),
      model=cfg,
      mesh=jax.make_mesh((8,), ("data",)),
    )


# ---------------------------------------------------------------------------------- sharded weights

AXES = ("data", "fsdp", "tensor")
RULES = sharding.axis_rules(
  config_lib.base_config().mesh
)  # Training's rules: the config's default.
SHARDED_CASES = {
  "greedy": sampling.SamplingSettings(cfg_scale=3.0, top_k=1),
  "seeded": sampling.SamplingSettings(cfg_scale=2.0, temperature=1.1, top_k=20, top_p=0.9),
}


@pytest.fixture(scope="module")
def replicated_codes(tiny):
  """The replicated sampler's codes of each case, on one device (8 devices give the same codes:
  test_eight_devices_give_the_samples_of_one)."""
  cfg, params, _ = tiny
  labels = np.arange(8, dtype=np.int32) % N_CLASSES
  return {
    case: np.asarray(
      sampling.sample_codes(
        params, labels, jax.random.key(4), model=cfg, settings=settings, first_index=3
      )
    )
    for case, settings in SHARDED_CASES.items()
  }


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4)])
@pytest.mark.parametrize("case", sorted(SHARDED_CASES))
def test_sharded_sampler_equals_replicated(tiny, replicated_codes, shape, case):
  """Weights split over fsdp and tensor, caches over the batch and heads, the batch over data and
  fsdp: the same codes as the replicated sampler, greedy and seeded, with guidance (fp32; exact)."""
  cfg, params, _ = tiny
  data, fsdp, tensor = shape
  sampler = sampling.Sampler(
    cfg, SHARDED_CASES[case], jax.make_mesh(shape, AXES, devices=jax.devices()[:8]), RULES
  )
  placed = sampler.place_params(params)
  # As training splits them: the embedding width over fsdp, heads, FFN width and vocabulary over
  # tensor.
  for path, want in [
    (("layers_0", "attention", "wqkv", "kernel"), (32 // fsdp, 96 // tensor)),
    (("layers_1", "feed_forward", "w2", "kernel"), (96 // tensor, 32 // fsdp)),
    (("tok_embeddings", "embedding"), (64 // tensor, 32 // fsdp)),
    (("norm", "scale"), (32,)),
  ]:
    x = functools.reduce(lambda t, k: t[k], path, placed)
    assert x.sharding.shard_shape(x.shape) == want, path
  assert sampler.batch_devices == data * fsdp
  labels = np.arange(8, dtype=np.int32) % N_CLASSES
  got = sampler.sample(placed, labels, jax.random.key(4), first_index=3)
  assert got.sharding.shard_shape(got.shape)[0] == 8 // (data * fsdp)
  np.testing.assert_array_equal(np.asarray(got), replicated_codes[case])


def test_a_sharded_training_state_is_placed_on_the_devices(tiny, replicated_codes):
  """Scanned weights split as training splits them (FID during training): placed by one program
  into the sampler's layout, the same values and codes as from host arrays."""
  cfg, params, _ = tiny
  mesh = jax.make_mesh((2, 2, 2), AXES, devices=jax.devices()[:8])
  scanned = dataclasses.replace(cfg, scan_layers=True)
  state_shardings = sharding.logical_shardings(gpt.abstract_params(scanned), mesh, RULES)
  state = jax.device_put(gpt.stack_layers(params, cfg.n_layer), nn.unbox(state_shardings))
  sampler = sampling.Sampler(cfg, SHARDED_CASES["seeded"], mesh, RULES)
  placed = sampler.place_params(state)
  from_host = sampler.place_params(jax.tree.map(np.asarray, params))
  chex.assert_trees_all_equal(placed, from_host)
  jax.tree.map(lambda x, y: assert_same_sharding(x, y), placed, from_host)
  labels = np.arange(8, dtype=np.int32) % N_CLASSES
  got = sampler.sample(placed, labels, jax.random.key(4), first_index=3)
  np.testing.assert_array_equal(np.asarray(got), replicated_codes["seeded"])


def assert_same_sharding(x, y):
  assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


def test_prefill_and_decode_compile_from_shapes_and_are_the_loop(tiny):
  """The two programs an ahead-of-time compile sees (`--mode=compile`) lower from ShapeDtypeStructs
  alone; run step by step they give the jitted loop's codes, and the caches they carry are split
  over the batch (data, fsdp) and the KV heads (tensor)."""
  cfg, params, _ = tiny
  mesh = jax.make_mesh((1, 2, 4), AXES, devices=jax.devices()[:8])
  sampler = sampling.Sampler(cfg, SHARDED_CASES["seeded"], mesh, RULES)
  programs = sampler.programs(4)
  assert sorted(programs) == ["sample_decode", "sample_prefill"]
  compiled = {name: fn.lower(*args).compile() for name, (fn, args) in programs.items()}
  prefill_args = programs["sample_prefill"][1]
  chex.assert_trees_all_equal_shapes_and_dtypes(
    prefill_args[0], jax.tree.map(lambda x: x.astype(jnp.float32), params)
  )
  placed = sampler.place_params(params)
  rep = sharding.replicated(sampler.mesh)
  labels = sharding.put(
    np.array([3, 1, 4, 1], np.int32), compiled["sample_prefill"].input_shardings[0][1]
  )
  rng, first, knobs = sharding.put(
    (jax.random.key(8), jnp.int32(5), SHARDED_CASES["seeded"].knobs()), rep
  )
  state = compiled["sample_prefill"](placed, labels, rng, first, knobs)
  keys = state["cache"][0][0]  # [2B, Hkv, n, hd]: guidance doubles the sequences.
  chex.assert_shape(keys, (8, cfg.n_kv_head, 16, cfg.head_dim))
  assert keys.sharding.shard_shape(keys.shape) == (4, cfg.n_kv_head // 4, 16, cfg.head_dim)
  for t in range(1, 16):
    state = compiled["sample_decode"](placed, state, sharding.put(jnp.int32(t), rep), knobs)
  loop = sampler.sample(placed, np.array([3, 1, 4, 1], np.int32), jax.random.key(8), first_index=5)
  np.testing.assert_array_equal(np.asarray(state["codes"]).reshape(4, 4, 4), np.asarray(loop))


def test_cache_heads_stay_whole_when_they_do_not_split():
  """2 KV heads over tensor = 4: each device keeps all heads of its samples; codes unchanged."""
  cfg = gpt.GPTConfig.from_config(tiny_model_config(n_kv_head=2))
  params = random_params(cfg)[1]
  mesh = jax.make_mesh((1, 2, 4), AXES, devices=jax.devices()[:8])
  settings = SHARDED_CASES["greedy"]
  sampler = sampling.Sampler(cfg, settings, mesh, RULES)
  fn, args = sampler.programs(2)["sample_decode"]
  cache = args[1]["cache"][0][0]
  assert cache.sharding.shard_shape(cache.shape) == (2, 2, 16, cfg.head_dim)
  labels = np.array([7, 2], np.int32)
  got = sampling.sample_codes(
    params, labels, jax.random.key(0), model=cfg, settings=settings, mesh=mesh, rules=RULES
  )
  want = sampling.sample_codes(params, labels, jax.random.key(0), model=cfg, settings=settings)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
  "model_kw,shape,rules,batch,match",
  [
    (
      dict(vocab_size=60),
      (1, 1, 8),
      RULES,
      8,
      r"parameter \S+ of shape .*60.* does not split over",
    ),
    ({}, (1, 8, 1), (("embed", "model"),), 8, "mesh.rules maps 'embed' to mesh axis 'model'"),
    ({}, (2, 2, 2), RULES, 6, "batch of 6 samples over 4 devices .*expected a multiple of 4"),
  ],
)
def test_sharded_sampler_bad_layouts(monkeypatch, model_kw, shape, rules, batch, match):
  monkeypatch.setattr(sampling, "_programs", lambda *a: pytest.fail("compiled before the check"))
  cfg = gpt.GPTConfig.from_config(tiny_model_config(**model_kw))
  mesh = jax.make_mesh(shape, AXES, devices=jax.devices()[:8])
  with pytest.raises(ValueError, match=match):
    sampling.Sampler(cfg, sampling.SamplingSettings(), mesh, rules).check_batch(batch)


# ---------------------------------------------------------------------------------------------- job


def job_config(**sample_kw):
  c = config_lib.base_config()
  c.model = tiny_model_config()
  if "sample" not in c:
    c.sample = config_lib.sample_config()
  c.sample.num_images, c.sample.batch_size = 10, 8
  c.sample.cfg_scale = 2.0
  for key, value in sample_kw.items():
    c.sample[key] = value
  return c


@pytest.fixture(scope="module")
def tiny_params():
  cfg = gpt.GPTConfig.from_config(tiny_model_config())
  return random_params(cfg)[1]


def test_sampler_from_config_is_the_runs_sampler():
  """What `--mode=compile` builds for a TPU slice: the config's settings and mesh rules, model.dtype
  as the compute dtype on a TPU (sample.dtype="auto"), float32 on this CPU."""
  config = job_config(top_k=7, temperature=0.8)
  config.mesh.shape, config.model.dtype = (1, 2, 4), "bfloat16"
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  tpu = sampling.Sampler.from_config(config, mesh, platform="tpu")
  assert tpu.settings == sampling.SamplingSettings(cfg_scale=2.0, temperature=0.8, top_k=7)
  assert tpu.rules == sharding.axis_rules(config.mesh)
  assert tpu.model.dtype == jnp.bfloat16 and not tpu.model.scan_layers
  assert sampling.Sampler.from_config(config, mesh).model.dtype == jnp.float32
  params = tpu.programs(4)["sample_decode"][1][0]
  wqkv = params["layers_0"]["attention"]["wqkv"]["kernel"]
  assert wqkv.dtype == jnp.bfloat16 and wqkv.sharding.shard_shape(wqkv.shape) == (16, 24)


def test_job_writes_codes_and_resumes_only_missing_shards(tmp_path, tiny_params):
  config = job_config()
  merged = sample.run(config, str(tmp_path), params=tiny_params).outputs["samples"]
  out_dir = tmp_path / "samples"
  shards = sorted(p.name for p in out_dir.glob("shard_*.npz"))
  assert shards == ["shard_00-08.npz", "shard_08-10.npz"]
  with np.load(merged) as z:
    assert set(z.files) == {"codes", "labels"}  # No VQ: codes only.
    codes, labels = z["codes"], z["labels"]
  chex.assert_shape(codes, (10, 4, 4))
  np.testing.assert_array_equal(labels, np.arange(10) % N_CLASSES)
  # Sample i is the sampler's sample i, whatever the batch it was drawn in.
  cfg = gpt.GPTConfig.from_config(config.model)
  settings = sampling.SamplingSettings(cfg_scale=2.0)
  direct = sampling.sample_codes(
    tiny_params, labels, jax.random.key(0), model=cfg, settings=settings
  )
  np.testing.assert_array_equal(codes, np.asarray(direct))

  os.remove(out_dir / "shard_00-08.npz")
  kept = out_dir / "shard_08-10.npz"
  stamp = kept.stat().st_mtime_ns
  sample.run(config, str(tmp_path), params=tiny_params)
  assert kept.stat().st_mtime_ns == stamp  # Finished shards are not redone.
  assert (out_dir / "shard_00-08.npz").exists()
  with np.load(merged) as z:
    np.testing.assert_array_equal(z["codes"], codes)
  assert not list(out_dir.glob("*.tmp"))


def test_job_writes_images_with_a_vq(tmp_path, tiny_params):
  from PIL import Image

  from npp_jax import checkpoints
  from npp_jax.models import vq

  config = job_config(classes=(3, 7), num_images=6, grid_rows=2, grid_cols=2)
  config.vq = config_lib.vq_config()
  config.vq.codebook_size, config.vq.ch, config.vq.ch_mult = 64, 32, (1, 1)
  config.vq.z_channels, config.vq.num_res_blocks, config.vq.image_size = 32, 1, 8
  vq_dir = str(tmp_path / "vq")
  checkpoints.save_params(vq_dir, random_vq_params(vq.VQConfig.from_config(config.vq), 0))
  config.sample.vq_checkpoint = vq_dir
  # The GPT comes from disk here: a converted checkpoint, read by npp_jax.checkpoints.load_params.
  gpt_dir = str(tmp_path / "gpt")
  checkpoints.save_params(gpt_dir, tiny_params)
  config.sample.checkpoint = gpt_dir
  config.sample.use_ema = (
    True  # A converted checkpoint holds one set of weights: refused, nothing written.
  )
  with pytest.raises(ValueError, match="converted checkpoint"):
    sample.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config.sample.use_ema = False
  merged = sample.run(config, str(tmp_path / "run")).outputs["samples"]
  with np.load(merged) as z:
    images, labels = z["arr_0"], z["labels"]
  assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 3)
  np.testing.assert_array_equal(labels, [3, 7, 3, 7, 3, 7])
  png = np.asarray(Image.open(os.path.join(os.path.dirname(merged), "samples_6.png")))
  assert png.shape == (16, 16, 3)
  np.testing.assert_array_equal(png[:8, :8], images[0])  # Row 0: class 3; row 1: class 7.
  np.testing.assert_array_equal(png[8:, 8:], images[3])


@pytest.mark.parametrize(
  "sample_kw,match",
  [
    (
      dict(classes=(1, N_CLASSES)),
      r"sample.classes holds 10; expected class ids in \[0, model.num_classes=10\)",
    ),
    (dict(batch_size=4), "multiple of 8"),
    (dict(num_images=0), "num_images"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=2.0), "top_p"),
    (dict(cfg_scale=0.0), "cfg_scale"),
    (dict(vq_checkpoint="/nonexistent/vq"), "vq"),
    (dict(dtype="float8"), "sample.dtype"),
  ],
)
def test_job_bad_inputs_fail_before_compile_or_write(
  tmp_path, tiny_params, monkeypatch, sample_kw, match
):
  monkeypatch.setattr(sampling, "_programs", lambda *a: pytest.fail("compiled before the check"))
  with pytest.raises(ValueError, match=match):
    sample.run(job_config(**sample_kw), str(tmp_path), params=tiny_params)
  assert not (tmp_path / "samples").exists()


def test_job_refuses_a_checkpoint_of_another_size(tmp_path, monkeypatch):
  monkeypatch.setattr(sampling, "_programs", lambda *a: pytest.fail("compiled before the check"))
  other = random_params(gpt.GPTConfig.from_config(tiny_model_config(dim=64)))[1]
  with pytest.raises(ValueError, match="does not fit model.name='custom'"):
    sample.run(job_config(), str(tmp_path), params=other)
  with pytest.raises(ValueError, match="sample.checkpoint is empty"):
    sample.run(job_config(), str(tmp_path))
  with pytest.raises(ValueError, match="does not exist"):
    sample.run(job_config(checkpoint=str(tmp_path / "nothing")), str(tmp_path))
  assert not (tmp_path / "samples").exists()


def test_job_refuses_to_mix_settings_on_resume(tmp_path, tiny_params):
  sample.run(job_config(num_images=8), str(tmp_path), params=tiny_params)
  with pytest.raises(ValueError, match="seed"):
    sample.run(job_config(num_images=8, seed=1), str(tmp_path), params=tiny_params)


# -------------------------------------------------------------------------------- several processes

_CONFIG_FILE = """
from npp_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  m = c.model
  m.name, m.n_layer, m.n_head, m.dim, m.multiple_of, m.dtype = "custom", 2, 4, 32, 32, "float32"
  m.vocab_size, m.num_classes, m.grid = 64, 10, (4, 4)
  c.vq.codebook_size, c.vq.ch, c.vq.ch_mult = 64, 32, (1, 1)
  c.vq.z_channels, c.vq.num_res_blocks, c.vq.image_size = 32, 1, 8
  c.sample.num_images, c.sample.batch_size, c.sample.cfg_scale, c.sample.top_k = 20, 16, 2.0, 16
  c.sample.checkpoint, c.sample.vq_checkpoint = {gpt!r}, {vq!r}
  c.mesh.shape = (-1, 1, 1)
  return c
"""


def test_job_on_two_processes_equals_one_process(tmp_path, tiny_params):
  """2 processes x 4 CPU devices (loopback, the CLI's flags) sample what 1 process x 8 devices
  samples: each process decodes its devices' share, process 0 writes the npz and the PNG once; a
  resumed run samples only the missing shard."""
  from npp_jax import checkpoints
  from npp_jax.models import vq

  config_path = tmp_path / "cfg.py"
  config_path.write_text(_CONFIG_FILE.format(gpt=str(tmp_path / "gpt"), vq=str(tmp_path / "vq")))
  config = config_lib.load(str(config_path))
  checkpoints.save_params(str(tmp_path / "gpt"), tiny_params)
  checkpoints.save_params(
    str(tmp_path / "vq"), random_vq_params(vq.VQConfig.from_config(config.vq), 0)
  )
  one = sample.run(config, str(tmp_path / "one")).outputs["samples"]  # This process: 8 devices.

  def two_processes():
    cmd = [
      "--mode=sample",
      f"--config={config_path}",
      f"--workdir={tmp_path / 'two'}",
      f"--coordinator_address=127.0.0.1:{free_port()}",
      "--num_processes=2",
    ]
    procs = [
      start_main(
        *cmd,
        f"--process_id={i}",
        env=multiprocess_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)

  two_processes()
  samples = tmp_path / "two" / "samples"
  two = samples / "samples_20.npz"
  with np.load(one) as a, np.load(two) as b:
    assert sorted(a.files) == sorted(b.files) == ["arr_0", "codes", "labels"]
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])
  png = samples / "samples_20.png"
  assert png.read_bytes() == (tmp_path / "one" / "samples" / "samples_20.png").read_bytes()
  # Resume: the second shard and the outputs are gone; only that shard is sampled again.
  first = (samples / "shard_00-16.npz").stat().st_mtime_ns
  for name in ("shard_16-20.npz", "samples_20.npz", "samples_20.png"):
    (samples / name).unlink()
  two_processes()
  assert (samples / "shard_00-16.npz").stat().st_mtime_ns == first
  with np.load(one) as a, np.load(two) as b:
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------------------------------------------------ text models

TEXT_T, TEXT_C = 6, 12  # Caption positions and feature width of the tiny text model.


def text_model_config(**kw):
  return tiny_model_config(condition="text", cls_token_num=TEXT_T, caption_dim=TEXT_C, **kw)


def random_captions(n, seed, lengths=None):
  """Left-padded caption features and masks as the sampler takes them (`sampling.left_pad`)."""
  rng = np.random.default_rng(seed)
  if lengths is None:
    lengths = rng.integers(1, TEXT_T + 1, size=n)
  captions = [rng.normal(size=(int(n_i), TEXT_C)).astype(np.float32) for n_i in lengths]
  return sampling.left_pad(captions, TEXT_T)


@pytest.fixture(scope="module")
def tiny_text():
  cfg = gpt.GPTConfig.from_config(text_model_config())
  model, params = random_params(cfg, seed=4)

  @jax.jit
  def full(p, tokens, caption, mask, null):
    return model.apply({"params": p}, tokens, caption, caption_mask=mask, null_caption=null)

  return cfg, params, full


def test_left_pad_moves_each_caption_to_the_end():
  captions = [np.full((2, 3), 1.0), np.full((4, 3), 2.0)]
  features, mask = sampling.left_pad(captions, 4)
  np.testing.assert_array_equal(mask, [[False, False, True, True], [True] * 4])
  np.testing.assert_array_equal(features[0, :, 0], [0, 0, 1, 1])
  np.testing.assert_array_equal(features[1, :, 0], [2, 2, 2, 2])
  with pytest.raises(ValueError, match=r"caption 0 of shape \(5, 3\); expected \[L, 3\]"):
    sampling.left_pad([np.zeros((5, 3))], 4)


@pytest.mark.parametrize("chunk", [1, 4])
def test_cached_text_decoding_matches_full_forward(tiny_text, chunk):
  """Padded captions (and a null caption with a caption's mask) prefilled into the cache, then the
  teacher tokens through it `chunk` positions per call: every logit from position T - 1 on equals
  the text GPT's full forward pass."""
  cfg, params, full = tiny_text
  b, (h, w), t = 4, cfg.grid, cfg.cls_token_num
  features, mask = random_captions(b, 0, lengths=[1, 3, TEXT_T, 2])
  null = jnp.array([False, False, False, True])
  tokens = jax.random.randint(jax.random.key(3), (b, h, w), 0, cfg.vocab_size)
  want = full(params, tokens, features, mask, null)

  decoder = gpt.Decoder(cfg)
  variables = {"params": params}
  cache = gpt.init_cache(cfg, b, gpt.cache_length(cfg))
  x = jnp.concatenate(
    [
      decoder.apply(variables, features, null, method=gpt.Decoder.embed_caption),
      decoder.apply(variables, tokens.reshape(b, -1)[:, :-1], method=gpt.Decoder.embed_tokens),
    ],
    axis=1,
  )
  chex.assert_shape(x, (b, gpt.cache_length(cfg), cfg.dim))
  step = jax.jit(lambda v, x, c, pos, m: decoder.apply(v, x, c, pos, m))
  logits, cache = step(variables, x[:, :t], cache, 0, mask)  # The prefill: T positions at once.
  got = [logits[:, -1:]]
  for pos in range(t, x.shape[1], chunk):
    logits, cache = step(variables, x[:, pos : pos + chunk], cache, pos, mask)
    got.append(logits)
  got = jnp.concatenate(got, axis=1)
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # The mask matters: without it the padded captions' logits differ.
  unmasked, _ = step(variables, x[:, :t], gpt.init_cache(cfg, b, gpt.cache_length(cfg)), 0, None)
  assert np.abs(np.asarray(unmasked[0, -1] - want[0, 0])).max() > 1e-3


def text_reference_logits(full, params, codes, features, mask, cfg, cfg_scale):
  """Guided logits [B, n, V] of every position from the text GPT's full forward (teacher forcing);
  the null caption keeps the caption's mask."""
  b = codes.shape[0]
  grid = codes.reshape(b, *cfg.grid)
  no = np.zeros(b, bool)
  cond = np.asarray(full(params, grid, features, mask, no), np.float64)
  if cfg_scale <= 1.0:
    return cond
  uncond = np.asarray(full(params, grid, features, mask, ~no), np.float64)
  return uncond + cfg_scale * (cond - uncond)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_greedy_text_sampling_is_the_stepwise_full_forward_argmax(tiny_text, cfg_scale):
  cfg, params, full = tiny_text
  features, mask = random_captions(4, 1)
  settings = sampling.SamplingSettings(cfg_scale, top_k=1)
  codes = np.asarray(
    sampling.sample_codes(params, (features, mask), jax.random.key(0), model=cfg, settings=settings)
  ).reshape(4, -1)
  want = text_reference_logits(full, params, codes, features, mask, cfg, cfg_scale)
  np.testing.assert_array_equal(codes, want.argmax(-1))
  assert len(np.unique(codes)) > 4  # Not a constant grid.


def test_text_sampling_on_eight_devices_equals_one(tiny_text):
  cfg, params, _ = tiny_text
  features, mask = random_captions(8, 2)
  mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  # Seeded with guidance (greedy text sampling is checked against the full forward above).
  for settings in [sampling.SamplingSettings(3.0, top_k=20, temperature=1.3)]:
    kw = dict(model=cfg, settings=settings)
    one = sampling.sample_codes(params, (features, mask), jax.random.key(7), mesh=mesh1, **kw)
    mesh8 = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    eight = sampling.sample_codes(
      params, (features, mask), jax.random.key(7), mesh=mesh8, rules=RULES, **kw
    )
    assert len(eight.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(eight), np.asarray(one))


# ------------------------------------------------------------------------------ text sampling job

_TEXT_CONFIG_FILE = """
from npp_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  m = c.model
  m.name, m.n_layer, m.n_head, m.dim, m.multiple_of, m.dtype = "custom", 2, 4, 32, 32, "float32"
  m.vocab_size, m.num_classes, m.grid = 64, 10, (4, 4)
  m.condition, m.cls_token_num, m.caption_dim = "text", {t}, {c}
  c.vq.codebook_size, c.vq.ch, c.vq.ch_mult = 64, 32, (1, 1)
  c.vq.z_channels, c.vq.num_res_blocks, c.vq.image_size = 32, 1, 8
  c.sample.batch_size, c.sample.cfg_scale, c.sample.top_k = 8, 7.5, 16
  c.sample.images_per_caption, c.sample.grid_cols = 3, 2
  c.sample.checkpoint = {gpt!r}
  c.mesh.shape = (-1, 1, 1)
  return c
"""


def run_cli(workdir, config_path, *flags):
  cmd = ["--mode=sample", f"--config={config_path}", f"--workdir={workdir}", *flags]
  return run_main(*cmd, env=multiprocess_env(1))


def write_text_job(tmp_path, t, c, seed=5):
  """A text model's checkpoint and a config file for it; -> (config path, params, config)."""
  from npp_jax import checkpoints

  path = tmp_path / "cfg.py"
  path.write_text(_TEXT_CONFIG_FILE.format(t=t, c=c, gpt=str(tmp_path / "gpt")))
  config = config_lib.load(str(path))
  params = random_params(gpt.GPTConfig.from_config(config.model), seed=seed)[1]
  checkpoints.save_params(str(tmp_path / "gpt"), params)
  return path, params, config


def direct_codes(params, config, captions, images_per_caption):
  """What the sampler gives for caption i's images, sample index i * ipc + j, on 8 devices."""
  cfg = gpt.GPTConfig.from_config(config.model)
  features, mask = sampling.left_pad(captions, cfg.cls_token_num)
  index = np.repeat(np.arange(len(captions)), images_per_caption)
  settings = sampling.SamplingSettings(7.5, top_k=16, caption_features="x")
  mesh = jax.make_mesh((8,), ("data",))
  n = len(index)
  pad = -n % 8
  index = np.concatenate([index, np.full(pad, index[-1])])
  codes = sampling.sample_codes(
    params,
    (features[index], mask[index]),
    jax.random.key(0),
    model=cfg,
    settings=settings,
    mesh=mesh,
  )
  return np.asarray(codes)[:n]


def test_text_job_from_caption_features_through_the_cli(tmp_path):
  """LlamaGen-format features (float32 (1, L, dim), L <= T) -> the npz in caption order, equal to
  the sampler's codes for the left-padded captions; resumable (a deleted shard is redone alone)."""
  path, params, config = write_text_job(tmp_path, TEXT_T, TEXT_C)
  rng = np.random.default_rng(0)
  folder = tmp_path / "features"
  folder.mkdir()
  captions = [rng.normal(size=(n, TEXT_C)).astype(np.float32) for n in (2, TEXT_T, 1, 4)]
  for i, cap in enumerate(captions):
    np.save(folder / f"{i}.npy", cap[None])
  flag = f"--config.sample.caption_features={folder}"
  done = run_cli(tmp_path / "w", path, flag)
  assert done.returncode == 0, done.stderr[-3000:]
  samples = tmp_path / "w" / "samples"
  with np.load(samples / "samples_12.npz") as z:
    assert sorted(z.files) == ["caption_index", "codes"]
    codes, index = z["codes"], z["caption_index"]
  np.testing.assert_array_equal(index, np.repeat(np.arange(4), 3))
  np.testing.assert_array_equal(codes, direct_codes(params, config, captions, 3))
  assert len({codes[i].tobytes() for i in range(0, 12, 3)}) == 4  # The caption matters.
  # Resume: only the missing shard is sampled again, to the same codes.
  kept = samples / "shard_00-08.npz"
  stamp = kept.stat().st_mtime_ns
  (samples / "shard_08-12.npz").unlink()
  assert run_cli(tmp_path / "w", path, flag).returncode == 0
  assert kept.stat().st_mtime_ns == stamp
  with np.load(samples / "samples_12.npz") as z:
    np.testing.assert_array_equal(z["codes"], codes)


def text_job_config(**sample_kw):
  c = job_config(**sample_kw)
  c.model = text_model_config()
  return c


@pytest.fixture(scope="module")
def tiny_text_params(tiny_text):
  return tiny_text[1]


def _feature_folder(path, shapes, dtype=np.float32, rename=None):
  path.mkdir()
  for i, shape in enumerate(shapes):
    np.save(path / f"{i}.npy", np.ones(shape, dtype))
  if rename:  # A gap in the numbering.
    (path / f"{rename[0]}.npy").rename(path / f"{rename[1]}.npy")
  return str(path)


def test_text_job_bad_inputs_fail_in_one_line_before_compile_or_write(
  tmp_path, monkeypatch, tiny_params, tiny_text_params
):
  monkeypatch.setattr(sampling, "_programs", lambda *a: pytest.fail("compiled before the check"))
  empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
  empty.write_text("\n  \n")
  latin.write_bytes("un caf\xe9\n".encode("latin-1"))
  t, c = TEXT_T, TEXT_C
  good = _feature_folder(tmp_path / "good", [(1, 2, c)])
  cases = [
    (dict(prompts=str(empty), text_encoder="t5"), "holds no prompt; expected one prompt a line"),
    (dict(prompts=str(latin), text_encoder="t5"), r"is not UTF-8 \(byte 6\); expected UTF-8"),
    (dict(prompts=str(latin)), "expected both"),
    (dict(prompts=str(latin), text_encoder="t5", caption_features=good), "expected one of them"),
    (dict(caption_features=good, images_per_caption=0), "sample.images_per_caption=0; expected"),
    (dict(), "model.condition='text' but sample.prompts and sample.caption_features are empty"),
    (dict(caption_features=str(tmp_path / "none")), "is not a directory"),
    (
      dict(caption_features=_feature_folder(tmp_path / "dim", [(1, 2, c), (1, 3, c + 1)])),
      rf"1.npy of shape \(1, 3, {c + 1}\) \(float32\); expected float \(1, L, "
      rf"model.caption_dim={c}\) with 1 <= L <= model.cls_token_num={t}",
    ),
    (
      dict(caption_features=_feature_folder(tmp_path / "long", [(1, t + 1, c)])),
      rf"of shape \(1, {t + 1}, {c}\)",
    ),
    (
      dict(caption_features=_feature_folder(tmp_path / "gap", [(1, 2, c)] * 2, rename=(1, 2))),
      "1.npy is missing; expected caption features 0.npy .. N-1.npy",
    ),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match) as e:
      sample.run(text_job_config(**kw), str(tmp_path), params=tiny_text_params)
    assert "\n" not in str(e.value)
  # A class checkpoint for a text model, the reverse, and captions for a class model.
  with pytest.raises(ValueError, match="is a class-conditional model but model.condition='text'"):
    sample.run(text_job_config(caption_features=good), str(tmp_path), params=tiny_params)
  with pytest.raises(ValueError, match="is a text-conditional model but model.condition='class'"):
    sample.run(job_config(), str(tmp_path), params=tiny_text_params)
  with pytest.raises(ValueError, match="sample.caption_features=.* but model.condition='class'"):
    sample.run(job_config(caption_features=good), str(tmp_path), params=tiny_params)
  assert not (tmp_path / "samples").exists()


def test_text_job_from_prompts_through_the_cli(tmp_path):
  """A prompts file encoded by a T5 folder (a random-weight HF T5 and a sentencepiece model built
  here) -> codes equal to the sampler's for the encoder's left-padded features, the images, and a
  PNG with one caption per row (its prompts listed beside it)."""
  from PIL import Image
  from support import t5_files

  from npp_jax import checkpoints
  from npp_jax import text_encoder
  from npp_jax.models import vq

  folder = t5_files.write_folder(
    tmp_path / "t5", t5_files.random_encoder(), t5_files.train_spiece()
  )
  t, c = 12, 32  # t5_files' encoder is 32 wide; 12 tokens cut the long prompt.
  path, params, config = write_text_job(tmp_path, t, c)
  checkpoints.save_params(
    str(tmp_path / "vq"), random_vq_params(vq.VQConfig.from_config(config.vq), 0)
  )
  prompts = [
    "A photo of a cat",
    "two dogs running on the beach at sunset, next to a small boat on a calm river",
    "an old castle",
  ]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
  flags = [
    f"--config.sample.prompts={tmp_path / 'prompts.txt'}",
    f"--config.sample.text_encoder={folder}",
    f"--config.sample.vq_checkpoint={tmp_path / 'vq'}",
  ]
  done = run_cli(tmp_path / "w", path, *flags)
  assert done.returncode == 0, done.stderr[-3000:]
  samples = tmp_path / "w" / "samples"
  with np.load(samples / "samples_9.npz") as z:
    assert sorted(z.files) == ["arr_0", "caption_index", "codes"]
    codes, index = z["codes"], z["caption_index"]
    chex.assert_shape(z["arr_0"], (9, 8, 8, 3))
  np.testing.assert_array_equal(index, np.repeat(np.arange(3), 3))
  mesh = sharding.make_mesh(config.mesh)  # The job's: (8, 1, 1).
  encoder = text_encoder.TextEncoder(folder, mesh, sharding.axis_rules(config.mesh), max_length=t)
  out = encoder(prompts)
  assert out.truncated >= 1 and out.lengths.min() < t  # Cut captions, and padded ones.
  captions = [f[:n] for f, n in zip(out.features, out.lengths)]
  np.testing.assert_array_equal(codes, direct_codes(params, config, captions, 3))
  # The grid: 3 rows (one per prompt) of grid_cols = 2 images, each with a caption strip.
  grid = np.asarray(Image.open(samples / "samples_9.png"))
  chex.assert_shape(grid, (3 * (8 + sample.CAPTION_STRIP), 2 * 8, 3))
  strip = grid[8 : 8 + sample.CAPTION_STRIP]
  assert (strip < 128).any() and (strip == 255).any()  # Text drawn on white.
  assert (samples / "samples_9.txt").read_text().splitlines() == prompts

  # The encoder's width must be the model's caption_dim.
  bad = text_job_config(prompts=str(tmp_path / "prompts.txt"), text_encoder=str(folder))
  with pytest.raises(
    ValueError, match=f"gives 32 features per token but model.caption_dim={TEXT_C}"
  ):
    sample.run(bad, str(tmp_path / "bad"), params=params)
  assert not (tmp_path / "bad").exists()


def test_text_prefill_and_decode_compile_from_shapes_and_are_the_loop(tiny_text):
  """A text model's two programs (`--mode=compile`) lower from shapes alone (caption features and
  mask as the condition); run step by step on a sharded mesh they give the loop's codes, with the
  caption mask carried in the state and caches of T + n - 1 positions."""
  cfg, params, _ = tiny_text
  mesh = jax.make_mesh((2, 2, 2), AXES, devices=jax.devices()[:8])
  settings = sampling.SamplingSettings(7.5, top_k=20, temperature=1.2)
  sampler = sampling.Sampler(cfg, settings, mesh, RULES)
  programs = sampler.programs(4)
  compiled = {name: fn.lower(*args).compile() for name, (fn, args) in programs.items()}
  placed = sampler.place_params(params)
  rep = sharding.replicated(sampler.mesh)
  features, mask = random_captions(4, 9)
  cond = sharding.put((features, mask), compiled["sample_prefill"].input_shardings[0][1])
  rng, first, knobs = sharding.put((jax.random.key(8), jnp.int32(5), settings.knobs()), rep)
  state = compiled["sample_prefill"](placed, cond, rng, first, knobs)
  n = cfg.grid[0] * cfg.grid[1]
  chex.assert_shape(state["cache"][0][0], (8, cfg.n_kv_head, TEXT_T + n - 1, cfg.head_dim))
  np.testing.assert_array_equal(np.asarray(state["text_mask"]), np.repeat(mask, 2, axis=0))
  for t in range(1, n):
    state = compiled["sample_decode"](placed, state, sharding.put(jnp.int32(t), rep), knobs)
  loop = sampler.sample(placed, (features, mask), jax.random.key(8), first_index=5)
  np.testing.assert_array_equal(np.asarray(state["codes"]).reshape(4, *cfg.grid), np.asarray(loop))


def test_text_job_from_prompts_on_two_processes_equals_one_process(tmp_path):
  """2 processes x 4 CPU devices (the CLI's flags): each encodes the prompts on the global mesh and
  samples its devices' share; the npz equals one process's (resuming is the shard loop's, tested
  with class samples on two processes)."""
  from support import t5_files

  folder = t5_files.write_folder(
    tmp_path / "t5", t5_files.random_encoder(), t5_files.train_spiece()
  )
  path, _, _ = write_text_job(tmp_path, 12, 32)
  (tmp_path / "prompts.txt").write_text("a red car\ntwo dogs on the beach\nan old castle\n")
  flags = [
    f"--config.sample.prompts={tmp_path / 'prompts.txt'}",
    f"--config.sample.text_encoder={folder}",
  ]
  one = run_cli(tmp_path / "one", path, *flags)
  assert one.returncode == 0, one.stderr[-3000:]

  cmd = ["--mode=sample", f"--config={path}", *flags]
  cmd += [f"--workdir={tmp_path / 'two'}", f"--coordinator_address=127.0.0.1:{free_port()}"]
  cmd += ["--num_processes=2"]
  procs = [
    start_main(
      *cmd,
      f"--process_id={i}",
      env=multiprocess_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
  samples = tmp_path / "two" / "samples"
  with np.load(tmp_path / "one" / "samples" / "samples_9.npz") as a:
    want = {k: a[k] for k in a.files}
  with np.load(samples / "samples_9.npz") as b:
    assert sorted(b.files) == ["caption_index", "codes"]
    for key in b.files:
      np.testing.assert_array_equal(b[key], want[key])
