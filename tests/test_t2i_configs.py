"""configs/t2i.py (LlamaGen's text-to-image sizes with the NPP schedule) and configs/tiny.py:text,
as `--config=` loads them (NPP.md, "Text to image")."""

from absl import flags
from ml_collections import config_flags
import pytest

from npp_jax import config_lib
from npp_jax.models import gpt


def test_t2i_xl_is_the_released_model_with_llamagen_recipe_and_the_npp_schedule():
  c = config_lib.load("configs/t2i.py:XL")
  cfg = gpt.GPTConfig.from_config(c.model)
  # t2i_XL_stage1_256.pt: GPT-XL on 16 x 16 VQ-16 codes, 120 FLAN-T5-XL positions of 2048.
  assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.vocab_size) == (36, 20, 1280, 16384)
  assert (cfg.condition, cfg.cls_token_num, cfg.caption_dim, cfg.grid) == (
    "text",
    120,
    2048,
    (16, 16),
  )
  assert (cfg.class_dropout, cfg.token_dropout, cfg.resid_dropout, cfg.ffn_dropout) == (0.1,) * 4
  o = c.optim
  assert (o.lr, o.weight_decay, o.b1, o.b2, o.grad_clip) == (1e-4, 0.05, 0.9, 0.95, 1.0)
  assert (c.train.global_batch_size, c.train.epochs, c.model.dtype) == (256, 300, "bfloat16")
  # The schedule and its per-stage learning rates are the class configs'.
  b = config_lib.load("configs/b.py")
  assert (c.npp, c.optim) == (b.npp, b.optim)
  assert (c.sample.cfg_scale, c.sample.top_k) == (7.5, 1000)  # LlamaGen's t2i sampling defaults.


@pytest.mark.parametrize("size", ["B", "L", "XL", "XXL", "XXXL", "1B", "3B", "7B"])
def test_every_size_at_256_and_512_px(size):
  c256 = config_lib.load(f"configs/t2i.py:{size}")
  c512 = config_lib.load(f"configs/t2i.py:{size}_512")
  assert c256.model.name == c512.model.name == f"GPT-{size}"
  assert (tuple(c256.model.grid), c256.vq.image_size) == ((16, 16), 256)
  assert (tuple(c512.model.grid), c512.vq.image_size) == ((32, 32), 512)  # Stage 2's grid.
  # Only the grid changes: a stage-1 checkpoint initialises stage 2 (RoPE follows the grid).
  assert gpt.param_shapes(c256.model) == gpt.param_shapes(c512.model)


def test_runlocal_and_tiny_text_keep_the_text_model_small():
  small = config_lib.load("configs/t2i.py:runlocal")
  cfg = gpt.GPTConfig.from_config(small.model)
  assert (cfg.n_layer, cfg.dim, small.train.global_batch_size) == (2, 64, 8)
  assert (cfg.condition, cfg.cls_token_num, cfg.caption_dim) == ("text", 120, 2048)
  assert small.npp == config_lib.load("configs/t2i.py:XL").npp
  tiny = gpt.GPTConfig.from_config(config_lib.load("configs/tiny.py:text").model)
  assert (tiny.condition, tiny.cls_token_num, tiny.caption_dim, tiny.n_layer) == ("text", 8, 32, 2)
  assert gpt.GPTConfig.from_config(config_lib.load("configs/tiny.py").model).condition == "class"


@pytest.mark.parametrize("spec", ["configs/t2i.py:XL_512", "configs/tiny.py:text"])
def test_load_gives_what_the_command_line_gets(spec, tmp_path, monkeypatch):
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values)
  flag_values(["main", f"--config={spec}"])
  want = flag_values.config.to_dict()
  monkeypatch.chdir(tmp_path)
  assert config_lib.load(spec).to_dict() == want


@pytest.mark.parametrize(
  "spec, message",
  [
    ("configs/t2i.py", "configs/t2i.py takes a size; expected configs/t2i.py:ARG, ARG one of"),
    ("configs/t2i.py:XS", "unknown config argument 'XS'; expected none or one of 'B', "),
    ("configs/tiny.py:txt", "unknown config argument 'txt'; expected none or one of 'text'"),
  ],
)
def test_bad_t2i_config_spec_is_one_line(spec, message):
  with pytest.raises(ValueError, match=message) as e:
    config_lib.load(spec)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("condition", "image", r"model.condition='image'; expected one of \('class', 'text'\)"),
    ("caption_dim", 0, "model.caption_dim=0; expected a positive integer"),
    ("cls_token_num", 0, "model.cls_token_num=0; expected a positive integer"),
  ],
)
def test_bad_condition_fields_are_one_line(field, value, message):
  c = config_lib.load("configs/tiny.py:text")
  c.model[field] = value
  with pytest.raises(ValueError, match=message) as e:
    gpt.GPTConfig.from_config(c.model)
  assert "\n" not in str(e.value)
