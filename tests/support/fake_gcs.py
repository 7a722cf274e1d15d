"""`gs://` paths served from a local folder, for tests of the file layer (tests/support/)

Inside `fake_gcs(root)`, every etils.epath operation on `gs://bucket/a/b` happens on
`root/bucket/a/b` (etils.epath.testing.mock_epath, with TensorFlow's gfile backend bypassed). Code
that keeps a user path on epath works unchanged; code that hands `gs://...` to `open()` / `os.*`
instead writes under `<cwd>/gs:/...` or fails, which the tests check. orbax's arrays go through
tensorstore's own GCS driver, not epath, so orbax cannot be served this way (it would contact the
real GCS).
"""

import contextlib
import os
from unittest import mock

from etils.epath import gpath
from etils.epath import testing

_FNS = (
  "open",
  "copy",
  "rename",
  "exists",
  "glob",
  "isdir",
  "listdir",
  "makedirs",
  "mkdir",
  "remove",
  "replace",
  "rmtree",
  "stat",
)


@contextlib.contextmanager
def fake_gcs(root):
  root = os.fspath(root)

  def local(p):
    s = os.fspath(p) if isinstance(p, (str, os.PathLike)) else p
    return (
      os.path.join(root, s[len("gs://") :]) if isinstance(s, str) and s.startswith("gs://") else p
    )

  def wrap(original, path, *args, **kw):
    return original(local(path), *[local(a) for a in args], **kw)

  def walk(original, top, **kw):
    yield from original(local(top), **kw)

  def glob(original, pattern):
    # Results must be gs:// paths again, as the real backend returns them.
    return [f"gs://{os.path.relpath(p, root)}" for p in original(local(pattern))]

  fns = {name: wrap for name in _FNS}
  fns.update(walk=walk, glob=glob)
  with testing.mock_epath(**fns), mock.patch.object(gpath, "_is_tf_installed", lambda: False):
    yield
