"""Small real T5 artifacts for the text tests: a sentencepiece model trained here and a
random-weight Hugging Face T5 encoder folder (nothing can be downloaded)."""

import io
import json
import pathlib

import numpy as np

SENTENCES = [
  "a photo of a cat sitting on a wooden table",
  "two dogs running on the beach at sunset",
  "a red car parked next to a tall building",
  "the handwritten digit seven, drawn with a thick pen",
  "an oil painting of a mountain lake in the morning",
  "a bowl of fruit with apples, oranges and bananas",
  "a man riding a bicycle down a busy city street",
  "close-up of a yellow flower with a bee on it",
  "a small boat on a calm river under a cloudy sky",
  "children playing football in a green park",
  "a plate of pasta with tomato sauce and basil",
  "an old castle on a hill covered with snow",
]


def train_spiece(vocab_size: int = 96) -> bytes:
  """A unigram sentencepiece model with T5's special ids (pad 0, EOS 1, unk 2, no BOS)."""
  import sentencepiece as spm

  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(SENTENCES * 4),
    model_writer=out,
    vocab_size=vocab_size,
    model_type="unigram",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    character_coverage=1.0,
    minloglevel=2,
  )
  return out.getvalue()


def hf_config(**kw):
  from transformers import T5Config

  args = dict(
    vocab_size=224,  # >= the spiece pieces + HF's 100 sentinel ids.
    d_model=32,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    d_ff=48,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
  )
  args.update(kw)
  return T5Config(**args)


def random_encoder(seed: int = 0, **kw):
  """transformers' T5EncoderModel with random weights, norms included (never ones: a test of the
  norm weights must be able to fail)."""
  import torch
  from transformers import T5EncoderModel

  torch.manual_seed(seed)
  model = T5EncoderModel(hf_config(**kw)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.5 if "relative_attention_bias" in name else 0.2))
  return model


def write_folder(path, model, spiece: bytes, fmt: str = "safetensors") -> pathlib.Path:
  """A HF folder: config.json, spiece.model and the weights as `fmt`: "safetensors"
  (save_pretrained), "sharded" (save_pretrained in small shards with its index), "bin" (torch.save
  of the state dict, what older transformers wrote), "sharded_bin" (bins with a
  pytorch_model.bin.index.json)."""
  import torch

  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if fmt == "safetensors":
    model.save_pretrained(path)
  elif fmt == "sharded":
    model.save_pretrained(path, max_shard_size="20KB")
  else:
    model.config.to_json_file(path / "config.json")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "bin":
      torch.save(state, path / "pytorch_model.bin")
    else:
      names = sorted(state)
      halves = {"pytorch_model-00001-of-00002.bin": names[::2]}
      halves["pytorch_model-00002-of-00002.bin"] = names[1::2]
      weight_map = {}
      for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, path / file)
        weight_map.update({k: file for k in keys})
      (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (path / "spiece.model").write_bytes(spiece)
  return path


def hf_hidden(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    )
  return out.last_hidden_state.numpy()
