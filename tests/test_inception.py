"""The FID Inception against pytorch-fid's own modules on random weights, and the two resize
recipes."""

import numpy as np
import pytest
from support.weights import random_inception_state

from npp_jax import checkpoints
from npp_jax import convert
from npp_jax.models import inception

torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE
  torch.save(random_inception_state(), str(path))
  return str(path)


def torch_outputs(weights_file, images: np.ndarray) -> dict:
  """pool3, spatial (ADM's order) and logits from pytorch-fid's InceptionV3 with our weights
  file."""
  state = torch.load(weights_file, weights_only=True)
  old = pfi.load_state_dict_from_url
  pfi.load_state_dict_from_url = lambda *a, **k: (
    state
  )  # Strict load: our key names must be its names.
  try:
    net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  finally:
    pfi.load_state_dict_from_url = old
  caught = []
  mixed_6d = [m for m in net.blocks[2] if isinstance(m, pfi.FIDInceptionC)][2]  # 6b, 6c, 6d, 6e.
  mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: caught.append(o))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  with torch.no_grad():
    pool3 = net(x)[0][:, :, 0, 0]
    logits = pool3 @ state["fc.weight"].T + state["fc.bias"]
  spatial = caught[0][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)  # NHWC, as the TF graph.
  return {"pool3": pool3.numpy(), "spatial": spatial.numpy(), "logits": logits.numpy()}


def test_matches_pytorch_fid_with_resize(weights_file):
  """256 px uint8 images through pytorch-fid's resize (bilinear, align_corners=False) and
  network."""
  images = np.random.default_rng(1).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
  want = torch_outputs(weights_file, images)
  params = convert.inception_state_to_params(convert.load_torch_state(weights_file))
  checkpoints.check_param_shapes(params, inception.param_shapes(), "converted weights")
  import jax

  got = jax.jit(lambda p, x: inception.features(p, x, recipe="pytorch_fid"))(params, images)
  for key, shape in (("pool3", (3, 2048)), ("spatial", (3, 17 * 17 * 7)), ("logits", (3, 1008))):
    g = np.asarray(got[key])
    assert g.shape == shape == want[key].shape
    scale = np.abs(want[key]).max()
    assert scale > 1e-2  # Random weights kept the signal alive.
    np.testing.assert_allclose(g, want[key], rtol=0, atol=1e-4 * scale, err_msg=key)


def tf1_resize_bilinear(x: np.ndarray, out: int) -> np.ndarray:
  """TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) in plain NumPy, pixel by
  pixel: source = dest * in / out in float32, interpolate the two rows, then the two columns."""
  n, h, w, c = x.shape
  y = np.zeros((n, out, out, c), np.float32)
  for i in range(out):
    sy = np.float32(i) * (np.float32(h) / np.float32(out))
    y0 = int(np.floor(sy))
    y1 = min(y0 + 1, h - 1)
    fy = sy - y0
    for j in range(out):
      sx = np.float32(j) * (np.float32(w) / np.float32(out))
      x0 = int(np.floor(sx))
      x1 = min(x0 + 1, w - 1)
      fx = sx - x0
      top = x[:, y0, x0] + (x[:, y0, x1] - x[:, y0, x0]) * fx
      bottom = x[:, y1, x0] + (x[:, y1, x1] - x[:, y1, x0]) * fx
      y[:, i, j] = top + (bottom - top) * fy
  return y


def test_adm_preprocess_is_tf1_resize_bilinear():
  """The ADM evaluator's graph: TF1 ResizeBilinear (no half-pixel centres), then (x - 128) / 128."""
  images = np.random.default_rng(2).integers(0, 256, (2, 40, 31, 3), dtype=np.uint8)
  got = np.asarray(inception.preprocess(images, "adm", size=47))
  want = (tf1_resize_bilinear(images.astype(np.float32), 47) - 128.0) / 128.0
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # And it is not pytorch-fid's resize: the two recipes really differ.
  assert np.abs(np.asarray(inception.preprocess(images, "pytorch_fid", size=47)) - got).max() > 0.05


def test_adm_preprocess_matches_tensorflow_at_299():
  tf = pytest.importorskip("tensorflow")  # Not in the test extra (no TF wheels on some platforms).
  images = np.random.default_rng(2).integers(0, 256, (2, 256, 200, 3), dtype=np.uint8)
  want = tf.compat.v1.image.resize_bilinear(
    images.astype(np.float32), [299, 299], align_corners=False
  )
  got = np.asarray(inception.preprocess(images, "adm"))
  np.testing.assert_allclose(got, (want.numpy() - 128.0) / 128.0, rtol=0, atol=1e-6)


def test_preprocess_keeps_299_px_images():
  images = np.random.default_rng(3).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  np.testing.assert_allclose(
    np.asarray(inception.preprocess(images, "pytorch_fid")), images / 127.5 - 1, atol=1e-6
  )
  with pytest.raises(ValueError, match="expected one of"):
    inception.preprocess(images, "clean")


def test_wrong_weights_are_one_line_errors(weights_file):
  state = convert.load_torch_state(weights_file)
  bad = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ValueError, match=r"mis-shaped, e\.g\. fc\.weight \[1000, 2048\]"):
    convert.inception_state_to_params(bad)
  del bad["Mixed_7c.branch_pool.conv.weight"]
  with pytest.raises(ValueError, match="missing 1 keys"):
    convert.inception_state_to_params(bad)
