"""A Hugging Face T5 folder -> caption features on a mesh: LlamaGen's FLAN-T5-XL caption encoder.

The folder is what `save_pretrained` writes and the hub holds (`google/flan-t5-xl`): config.json,
spiece.model, and the weights as model.safetensors, sharded safetensors with
model.safetensors.index.json, pytorch_model.bin, or sharded bins with pytorch_model.bin.index.json.
Only the encoder's weights are read (a T5ForConditionalGeneration file holds the decoder too).
safetensors are read here, without the `safetensors` package (its NumPy reader has no bfloat16, and
it wants local files where we read through etils.epath); a .bin goes through
torch.load(weights_only=True), which runs no pickled code.

`TextEncoder(folder, mesh, rules)` checks the folder, reads config, tokenizer and weights (all
before any compile), places the weights on the mesh by the config's logical-axis rules, and encodes
batches of captions split over the data axes, in bf16 by default as LlamaGen's extractor runs it.
"""

import dataclasses
import json
import struct
from typing import Any, Sequence

from etils import epath
import jax
import ml_dtypes
import numpy as np

from npp_jax import sharding
from npp_jax import text
from npp_jax.models import t5

WEIGHT_FILES = (
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)

# --------------------------------------------------------------------------------------------------
# The folder.


@dataclasses.dataclass(frozen=True)
class T5Folder:
  path: epath.Path
  config: t5.T5Config
  weights: epath.Path  # The first of WEIGHT_FILES present.

  @property
  def spiece(self) -> epath.Path:
    return self.path / "spiece.model"


def check_folder(path, field: str = "text encoder", **dtypes) -> T5Folder:
  """The folder's files and config, checked; one-line ValueError naming what is missing or wrong."""
  folder = epath.Path(path)
  what = (
    "expected a Hugging Face T5 folder (config.json, spiece.model, model.safetensors or a .bin)"
  )
  if not str(path) or not folder.is_dir():
    raise ValueError(f"{field} {str(path)!r} is not a directory; {what}")
  for name in ("config.json", "spiece.model"):
    if not (folder / name).exists():
      raise ValueError(f"{field} {folder} has no {name}; {what}")
  try:
    hf = json.loads((folder / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{folder / 'config.json'} is not JSON ({e})") from None
  if not isinstance(hf, dict) or hf.get("model_type", "t5") != "t5":
    kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
    raise ValueError(f"{folder / 'config.json'} describes a {kind!r} model; expected 't5'")
  config = t5.T5Config.from_hf(hf, str(folder / "config.json"), **dtypes)
  for name in WEIGHT_FILES:
    if (folder / name).exists():
      return T5Folder(folder, config, folder / name)
  raise ValueError(f"{field} {folder} has none of {', '.join(WEIGHT_FILES)}; {what}")


# --------------------------------------------------------------------------------------------------
# Weights.

_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def _read_safetensors(path: epath.Path, names: set[str]) -> dict[str, np.ndarray]:
  """The tensors of `names` held in one .safetensors file: an 8-byte header size, a JSON header of
  {name: dtype, shape, data_offsets}, then the data; only the wanted byte ranges are read."""
  out = {}
  with path.open("rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    try:
      header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
    start = 8 + size
    for name in sorted(names & header.keys(), key=lambda n: header[n]["data_offsets"][0]):
      entry = header[name]
      if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: {name} has dtype {entry['dtype']}; expected a float type")
      begin, end = entry["data_offsets"]
      f.seek(start + begin)
      data = f.read(end - begin)
      out[name] = np.frombuffer(data, _SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
  return out


def _read_torch(path: epath.Path, names: set[str]) -> dict[str, np.ndarray]:
  """The tensors of `names` in a PyTorch .bin state dict, loaded with weights_only=True."""
  try:
    import torch
  except ImportError:
    raise ValueError(
      f"{path} is a PyTorch file and torch is not installed; expected model.safetensors, or "
      "`pip install npp_jax[torch]`"
    ) from None
  with path.open("rb") as f:
    try:
      state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files.
      raise ValueError(f"{path} is not a PyTorch state dict ({type(e).__name__})") from None
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}; expected a state dict")
  out = {}
  for name in names & state.keys():
    x = state[name].detach().cpu()
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits.
      out[name] = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[name] = x.numpy()
  return out


def read_weights(weights: epath.Path, names: set[str]) -> dict[str, np.ndarray]:
  """{name: array} of those of `names` that the weights file (or its shards, per its index)
  holds."""
  read = _read_torch if ".bin" in weights.name else _read_safetensors
  if not weights.name.endswith(".index.json"):
    return read(weights, names)
  weight_map = json.loads(weights.read_text()).get("weight_map", {})
  out = {}
  for shard in sorted({weight_map[n] for n in names if n in weight_map}):
    if not (weights.parent / shard).exists():
      raise ValueError(f"{weights} names shard {shard}, which is not in {weights.parent}")
    out.update(read(weights.parent / shard, names))
  return out


def load_params(folder: T5Folder) -> dict:
  """The encoder's parameters (NumPy, config.param_dtype) from the folder's weights."""
  names = set(t5.hf_names(folder.config)) | {t5.EMBED_ALIAS}
  return t5.params_from_hf(read_weights(folder.weights, names), folder.config, str(folder.weights))


# --------------------------------------------------------------------------------------------------
# Encoding on a mesh.


@dataclasses.dataclass(frozen=True)
class Captions:
  features: np.ndarray  # float32 [N, max_length, d_model]; rows past a caption's length are zero.
  lengths: np.ndarray  # int32 [N]: tokens including EOS.
  truncated: int  # Captions longer than max_length, cut (as LlamaGen's tokenizer call does).


class TextEncoder:
  """The T5 folder's encoder and tokenizer on `mesh`; call it with captions (raw text: it cleans
  them)."""

  def __init__(
    self,
    folder,
    mesh: jax.sharding.Mesh,
    axis_rules: Sequence[tuple[str, Any]],
    *,
    dtype: str = "bfloat16",
    param_dtype: str = "bfloat16",
    max_length: int = text.MAX_LENGTH,
    field: str = "text encoder",
  ):
    self.folder = check_folder(folder, field, dtype=dtype, param_dtype=param_dtype)
    self.config, self.mesh = self.folder.config, mesh
    self.tokenizer = text.Tokenizer(self.folder.spiece, max_length)
    if self.tokenizer.vocab_size > self.config.vocab_size:
      raise ValueError(
        f"{self.folder.spiece} has {self.tokenizer.vocab_size} pieces; config.json's vocab_size "
        f"{self.config.vocab_size} has no embedding for the last ones"
      )
    self.axis_rules = tuple(axis_rules)
    boxed = t5.abstract_params(self.config)
    shardings = sharding.logical_shardings(boxed, mesh, self.axis_rules)
    params = load_params(self.folder)
    self.params = jax.tree.map(lambda x, s: sharding.put(x, s), params, shardings)
    self._encode = jax.jit(self._forward, out_shardings=sharding.data_sharding(mesh))

  @property
  def max_length(self) -> int:
    return self.tokenizer.max_length

  def _forward(self, params, ids, mask):
    import flax.linen as nn

    with nn.logical_axis_rules(self.axis_rules):
      x = t5.T5Encoder(self.config).apply({"params": params}, ids, mask)
    return x * mask[..., None]

  def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    """This process's rows ids/mask [L, T] (L a multiple of its data-parallel devices) -> the global
    features [P * L, T, d_model] float32, split over the data axes; zero past each caption's
    length."""
    batch = sharding.data_sharding(self.mesh)
    put = lambda x: jax.make_array_from_process_local_data(batch, np.ascontiguousarray(x))
    with jax.set_mesh(self.mesh):
      return self._encode(self.params, put(ids), put(mask))

  def tokenize(self, captions: Sequence[str]) -> text.Tokens:
    """Cleaned as LlamaGen cleans them (text.clean), then tokenized."""
    return self.tokenizer([text.clean(c) for c in captions])

  def __call__(self, captions: Sequence[str]) -> Captions:
    """This process's captions -> the features of every process's captions, in process order.

    Every process passes the same number of captions; the batch is padded to the data-parallel
    devices.
    """
    tokens = self.tokenize(captions)
    n, per = len(captions), sharding.data_parallel_size(self.mesh) // jax.process_count()
    rows = -(-n // per) * per
    pad = lambda x: np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), x.dtype)])
    features = sharding.gather(self.encode_tokens(pad(tokens.ids), pad(tokens.mask)))
    keep = (np.arange(len(features)) % rows) < n
    lengths, truncated = tokens.lengths, tokens.truncated
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      both = np.asarray(multihost_utils.process_allgather(np.append(lengths, truncated)))
      lengths, truncated = both[:, :-1].reshape(-1), int(both[:, -1].sum())
    return Captions(np.asarray(features[keep]), lengths, truncated)
