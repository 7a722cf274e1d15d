"""A training checkpoint's architecture names the model's condition: a text workdir refuses a class
config and the reverse (one line, nothing touched), and checkpoints written before the field existed
read as class models."""

import numpy as np
import pytest

from npp_jax import checkpoints
from npp_jax import config_lib


def _arch(spec):
  return checkpoints.architecture(config_lib.load(spec).model)


def test_architecture_of_a_text_and_a_class_model():
  text, klass = _arch("configs/tiny.py:text"), _arch("configs/tiny.py")
  assert (text["condition"], text["cls_token_num"], text["caption_dim"]) == ("text", 8, 32)
  assert "num_classes" not in text  # A text model has no class table.
  assert klass["condition"] == "class" and "caption_dim" not in klass
  assert klass["num_classes"] == config_lib.load("configs/tiny.py").model.num_classes


def _save(folder, arch):
  ckpt = checkpoints.Checkpointer(folder, keep=1, architecture=arch, async_save=False)
  ckpt.save(1, {"w": np.arange(3, dtype=np.float32)}, force=True)
  ckpt.wait()
  ckpt.close()


@pytest.mark.parametrize(
  "saved, resumed",
  [("configs/tiny.py:text", "configs/tiny.py"), ("configs/tiny.py", "configs/tiny.py:text")],
)
def test_a_workdir_of_the_other_condition_is_refused_in_one_line(tmp_path, saved, resumed):
  _save(tmp_path / "ckpt", _arch(saved))
  ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", keep=1, architecture=_arch(resumed))
  with pytest.raises(checkpoints.CheckpointError, match="condition: checkpoint") as e:
    ckpt.check_architecture()
  assert "\n" not in str(e.value) and ckpt.latest_step() == 1


def test_a_checkpoint_from_before_the_condition_field_is_a_class_model(tmp_path):
  old = {k: v for k, v in _arch("configs/tiny.py").items() if k != "condition"}
  _save(tmp_path / "ckpt", old)
  checkpoints.Checkpointer(
    tmp_path / "ckpt", keep=1, architecture=_arch("configs/tiny.py")
  ).check_architecture()
  text = checkpoints.Checkpointer(
    tmp_path / "ckpt", keep=1, architecture=_arch("configs/tiny.py:text")
  )
  with pytest.raises(
    checkpoints.CheckpointError, match="condition: checkpoint 'class' vs config 'text'"
  ):
    text.check_architecture()
