"""The config files under configs/: each loads with the arguments it accepts, as `--config=` loads
it."""

from absl import flags
from ml_collections import config_flags
import pytest

from npp_jax import config_lib
from npp_jax.models import gpt

# File -> (model name, guidance scale): the sizes and scales NPP.md reports.
RELEASE = {
  "b.py": ("GPT-B", 2.0),
  "l.py": ("GPT-L", 1.75),
  "xl.py": ("GPT-XL", 1.70),
  "xxl.py": ("GPT-XXL", 1.65),
  "xxxl.py": ("GPT-XXXL", 1.65),
}


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_release_config_and_its_runlocal_variant(name):
  c = config_lib.load(f"configs/{name}")
  assert (c.model.name, c.sample.cfg_scale) == RELEASE[name]
  # The paper's recipe (NPP.md, "Training recipe").
  assert (c.train.global_batch_size, c.train.epochs, c.optim.lr, c.optim.weight_decay) == (
    256,
    300,
    1e-4,
    0.05,
  )
  assert (c.npp.patch_level, c.npp.epoch_rate, c.model.dtype) == (3, 0.5, "bfloat16")
  small = config_lib.load(f"configs/{name}:runlocal")
  cfg = gpt.GPTConfig.from_config(small.model)
  assert (cfg.n_layer, cfg.dim, small.train.global_batch_size) == (2, 64, 8)
  # Only the size of the run changes: the schedule and optimizer are the recipe's.
  assert (small.npp, small.optim.lr, small.sample) == (c.npp, c.optim.lr, c.sample)


@pytest.mark.parametrize(
  "spec", ["configs/b.py:runlocal", "configs/tiny.py", "configs/demo.py:smoke"]
)
def test_load_gives_what_the_command_line_gets(spec, tmp_path, monkeypatch):
  flag_values = flags.FlagValues()  # The command line's own parsing, on a private set of flags.
  config_flags.DEFINE_config_file("config", flag_values=flag_values)
  flag_values(["main", f"--config={spec}"])
  want = flag_values.config.to_dict()
  monkeypatch.chdir(tmp_path)  # Relative paths fall back to the checkout the package runs from.
  assert config_lib.load(spec).to_dict() == want


@pytest.mark.parametrize(
  "spec, message",
  [
    ("configs/demo.py:bogus", "unknown config argument 'bogus'; expected none or one of 'smoke'"),
    ("configs/tiny.py:x", "unknown config argument 'x'; expected none"),
    ("configs/xl.py:smoke", "unknown config argument 'smoke'; expected none or one of 'runlocal'"),
    ("configs/nope.py", "config file 'configs/nope.py' not found"),
  ],
)
def test_bad_config_spec_is_one_line(spec, message):
  with pytest.raises(ValueError, match=message) as e:
    config_lib.load(spec)
  assert "\n" not in str(e.value)
