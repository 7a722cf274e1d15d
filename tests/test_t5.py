"""The FLAN-T5 encoder (models/t5.py) and its Hugging Face folder (text_encoder.py) against
transformers' PyTorch T5EncoderModel and T5Tokenizer, on a random small config and a sentencepiece
model trained here."""

import json
import re

import chex
import jax
import numpy as np
import pytest
from support import t5_files

from npp_jax import config_lib
from npp_jax import sharding
from npp_jax import text
from npp_jax import text_encoder
from npp_jax.models import t5

CAPTIONS = [
  "A photo of a cat sitting on a wooden table",
  "two dogs running on the beach",
  "An oil painting of a mountain lake, in the morning!",
  "a bowl of fruit " * 40,  # 160+ words: cut to 119 tokens and EOS.
  "zebra",  # Pieces the tiny vocabulary lacks: unknown ids must agree too.
]


@pytest.fixture(scope="module")
def spiece():
  return t5_files.train_spiece()


@pytest.fixture(scope="module")
def model():
  return t5_files.random_encoder()


def _mesh(shape=(2, 2, 2)):
  mesh_config = config_lib.base_config().mesh
  mesh_config.shape = shape
  return sharding.make_mesh(mesh_config), sharding.axis_rules(mesh_config)


def test_relative_buckets_match_hf():
  import torch
  from transformers.models.t5.modeling_t5 import T5Attention

  for length, buckets, distance in ((300, 32, 128), (40, 16, 20), (7, 8, 4)):
    offset = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    want = T5Attention._relative_position_bucket(offset, True, buckets, distance).numpy()
    got = t5.relative_buckets(length, buckets, distance)
    np.testing.assert_array_equal(got, want)
    assert got.min() == 0 and got.max() == buckets - 1  # Every bucket reached: not a vacuous check.


def test_tokenizer_matches_hf(tmp_path, model, spiece):
  from transformers import T5Tokenizer

  folder = t5_files.write_folder(tmp_path, model, spiece)
  hf = T5Tokenizer.from_pretrained(str(folder))
  want = hf(CAPTIONS, max_length=120, padding="max_length", truncation=True, return_tensors="np")
  got = text.Tokenizer(folder / "spiece.model")(CAPTIONS)
  np.testing.assert_array_equal(got.ids, want["input_ids"])
  np.testing.assert_array_equal(got.mask, want["attention_mask"].astype(bool))
  assert got.truncated == 1
  chex.assert_trees_all_equal(got.lengths, want["attention_mask"].sum(1).astype(np.int32))
  assert got.ids[3, 119] == text.EOS_ID and got.ids[1, got.lengths[1] - 1] == text.EOS_ID
  assert (got.ids == 2).any()  # The unknown-piece caption is in the comparison.


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "sharded_bin"])
def test_encoder_matches_hf(tmp_path, model, spiece, fmt):
  folder = t5_files.write_folder(tmp_path, model, spiece, fmt)
  mesh, rules = _mesh()
  encoder = text_encoder.TextEncoder(folder, mesh, rules, dtype="float32", param_dtype="float32")
  got = encoder(CAPTIONS)
  tokens = encoder.tokenize(CAPTIONS)
  want = t5_files.hf_hidden(model, tokens.ids, tokens.mask)
  chex.assert_shape(got.features, (len(CAPTIONS), 120, 32))
  np.testing.assert_array_equal(got.lengths, tokens.lengths)
  assert got.truncated == 1
  valid = tokens.mask[..., None]
  np.testing.assert_allclose(got.features * valid, want * valid, atol=1e-4, rtol=1e-4)
  assert not np.any(got.features[~tokens.mask])  # Rows past a caption's length are zero.
  assert np.abs(want * valid).max() > 0.1  # Real activations, not vanishing ones.


def test_full_t5_checkpoint_loads_the_encoder(tmp_path, spiece):
  """A T5ForConditionalGeneration file (as google/flan-t5-xl's) holds the decoder too: only the
  encoder is read, and it equals the HF model's encoder."""
  import torch
  from transformers import T5ForConditionalGeneration

  torch.manual_seed(1)
  full = T5ForConditionalGeneration(t5_files.hf_config(num_decoder_layers=1)).eval()
  with torch.no_grad():
    for p in full.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  folder = t5_files.write_folder(tmp_path, full, spiece)
  mesh, rules = _mesh((8, 1, 1))
  encoder = text_encoder.TextEncoder(folder, mesh, rules, dtype="float32", param_dtype="float32")
  tokens = encoder.tokenize(CAPTIONS[:3])
  want = t5_files.hf_hidden(full.encoder, tokens.ids, tokens.mask)
  got = encoder(CAPTIONS[:3]).features
  valid = tokens.mask[..., None]
  np.testing.assert_allclose(got * valid, want * valid, atol=1e-4, rtol=1e-4)


def test_bf16_sharded(tmp_path, model, spiece):
  """The default run: bf16 parameters and compute, parameters split by the config's rules."""
  folder = t5_files.write_folder(tmp_path, model, spiece)
  mesh, rules = _mesh()
  encoder = text_encoder.TextEncoder(folder, mesh, rules)
  q = encoder.params["layers_0"]["attention"]["q"]["kernel"]
  assert q.dtype == jax.numpy.bfloat16
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  got = encoder(CAPTIONS).features
  tokens = encoder.tokenize(CAPTIONS)
  want = t5_files.hf_hidden(model, tokens.ids, tokens.mask) * tokens.mask[..., None]
  chex.assert_tree_all_finite(got)
  # bf16 keeps ~3 significant digits per op over 2 layers: a few percent of the activations' scale.
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_hf_config_fields(tmp_path, model, spiece):
  folder = t5_files.write_folder(tmp_path, model, spiece)
  cfg = text_encoder.check_folder(folder, dtype="float32", param_dtype="float32").config
  assert cfg == t5.T5Config(32, 8, 4, 2, 48, 224, 32, 128, 1e-6, np.float32, np.float32)


# --------------------------------------------------------------------------------------------------
# Bad folders: one line each, before any compile.


def _edit_config(folder, **changes):
  config = json.loads((folder / "config.json").read_text())
  config.update(changes)
  (folder / "config.json").write_text(json.dumps(config))


BAD_FOLDERS = {
  "no spiece": (lambda f: (f / "spiece.model").unlink(), "has no spiece.model"),
  "no config": (lambda f: (f / "config.json").unlink(), "has no config.json"),
  "no weights": (lambda f: (f / "model.safetensors").unlink(), "has none of model.safetensors"),
  "relu ffn": (lambda f: _edit_config(f, feed_forward_proj="relu"), "expected 'gated-gelu'"),
  "other model": (lambda f: _edit_config(f, model_type="bert"), "describes a 'bert' model"),
  "d_ff": (lambda f: _edit_config(f, d_ff=64), "DenseReluDense.wi_0.weight has shape (48, 32)"),
  "vocab": (lambda f: _edit_config(f, vocab_size=50), "has no embedding for the last ones"),
  "spiece": (lambda f: (f / "spiece.model").write_bytes(b"not a model"), "not a sentencepiece"),
  "header": (
    lambda f: (f / "model.safetensors").write_bytes(b"\x04" + bytes(7) + b"{{{{"),
    "not a safetensors file",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folder(tmp_path, model, spiece, case, monkeypatch):
  folder = t5_files.write_folder(tmp_path / "t5", model, spiece)
  edit, message = BAD_FOLDERS[case]
  edit(folder)
  mesh, rules = _mesh()
  monkeypatch.setattr(jax, "jit", _no_compile)
  with pytest.raises(ValueError, match=re.escape(message)) as e:
    text_encoder.TextEncoder(folder, mesh, rules)
  assert "\n" not in str(e.value)


def test_not_a_folder(tmp_path):
  mesh, rules = _mesh()
  with pytest.raises(ValueError, match="is not a directory; expected a Hugging Face T5 folder"):
    text_encoder.TextEncoder(tmp_path / "missing", mesh, rules)


def _no_compile(*args, **kwargs):
  raise AssertionError("compiled before the folder was checked")
