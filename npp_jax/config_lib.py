"""The one config schema every config file starts from: the paper's recipe, every knob a field.

Config files under `configs/` call `base_config()` and change what differs. Fields that may be unset are
`placeholder`s so that a locked config still accepts them from the command line.
"""
import ml_collections
from ml_collections import config_dict

# LlamaGen's GPT sizes: name -> (n_layer, n_head, dim). NPP.md, "Reported results".
MODEL_SIZES = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}


def model_config(name: str = "GPT-B") -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  # A name from MODEL_SIZES, or "custom" with n_layer / n_head / dim set (tiny test and demo models).
  m.name = name
  m.n_layer = config_dict.placeholder(int)
  m.n_head = config_dict.placeholder(int)
  m.dim = config_dict.placeholder(int)
  m.n_kv_head = config_dict.placeholder(int)  # None: as many KV heads as query heads.
  m.vocab_size = 16384
  m.num_classes = 1000
  m.grid = (16, 16)  # Code grid (rows, cols): 256 px through VQ-16.
  m.cls_token_num = 1
  m.multiple_of = 256
  m.ffn_dim_multiplier = config_dict.placeholder(float)
  m.norm_eps = 1e-5
  m.rope_base = 10000.0
  m.token_dropout = 0.1
  m.resid_dropout = 0.1
  m.ffn_dropout = 0.1
  m.class_dropout = 0.1  # Label drop for classifier-free guidance.
  m.dtype = "bfloat16"  # Compute dtype; parameters stay in param_dtype.
  m.param_dtype = "float32"
  m.scan_layers = False
  m.remat = "none"  # "none" | "full" | "dots" (save matmul outputs only).
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()

  # Coarse-to-fine schedule (NPP.md 5). Either the release's (patch_level, epoch_rate) over train.epochs,
  # or explicit stages ((k, epochs), ...) that then define the run's length.
  c.npp = ml_collections.ConfigDict()
  c.npp.patch_level = 3
  c.npp.epoch_rate = 0.5
  c.npp.stages = ()

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.end_lr = 1e-5
  c.optim.weight_decay = 0.05  # Only on >= 2-D weights.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0
  c.optim.warmup_epochs = 5.0  # Paper appendix (the release's code default is 1); restarts every stage.
  c.optim.decay_ratio = 0.2  # Linear decay to end_lr over this last fraction of every stage.
  c.optim.ema_decay = 0.0  # 0 turns the EMA off, as in the release.

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 300
  c.train.global_batch_size = 256
  c.train.grad_accum_steps = 1  # Micro-batches per optimizer step (global_batch_size is per step).
  c.train.max_steps = -1  # > 0 stops early (smoke runs); the schedule still spans train.epochs.
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 2000
  c.train.keep_checkpoints = 3
  c.train.init_from = ""  # A checkpoint directory whose parameters start this run (converted weights).
  c.train.profile = False
  c.train.peak_flops_per_device = 0.0  # For MFU where the device is not in costs.PEAK_FLOPS (0: look up).

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # Directory of the code data set (npp_jax.data); required for training.
  c.data.worker_count = 0
  c.data.shuffle_seed = 0

  # Mesh axes (data, fsdp, tensor); -1 takes the devices left. Logical-axis rules map parameter and
  # activation axes onto them (maxtext style): model code names axes, the config decides the layout.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)
  c.mesh.axes = ("data", "fsdp", "tensor")
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("vocab", "tensor"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("classes", None),
      ("layers", None),
      ("norm", None),
  )
  c.vq = vq_config()
  c.sample = sample_config()
  return c


def release_config(name: str, cfg_scale: float, arg: str | None = None) -> ml_collections.ConfigDict:
  """A released model size with the paper's recipe; arg "runlocal" shrinks it to run on a laptop CPU."""
  c = base_config()
  c.model.name = name
  if "sample" in c:
    c.sample.cfg_scale = cfg_scale  # The paper's best guidance scale for this size.
  if arg == "runlocal":
    c.model.name = "custom"
    c.model.n_layer, c.model.n_head, c.model.dim = 2, 4, 64
    c.model.dtype = "float32"
    c.train.global_batch_size = 8
    c.train.epochs = 4
    c.train.log_every_steps = 1
    c.optim.warmup_epochs = 0.5
  elif arg:
    raise ValueError(f"config argument {arg!r}; expected nothing or 'runlocal'")
  return c


def tiny_config() -> ml_collections.ConfigDict:
  """A model and run small enough for CPU tests: 2 layers, dim 64, 16x16 grid, 256 codes, 10 classes."""
  c = base_config()
  c.model.name = "custom"
  c.model.n_layer, c.model.n_head, c.model.dim = 2, 2, 64
  c.model.vocab_size, c.model.num_classes = 256, 10
  c.model.multiple_of = 32
  c.model.dtype = "float32"
  c.model.token_dropout = c.model.resid_dropout = c.model.ffn_dropout = 0.0
  c.train.global_batch_size = 16
  c.train.epochs = 8
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 4
  c.optim.lr = 3e-3
  c.optim.end_lr = 3e-4
  c.optim.warmup_epochs = 0.5
  return c


def vq_config() -> ml_collections.ConfigDict:
  """LlamaGen's VQ-16 tokenizer (NPP.md, "The VQ-16 tokenizer"): the released checkpoint's architecture."""
  v = ml_collections.ConfigDict()
  v.codebook_size = 16384
  v.codebook_embed_dim = 8
  v.z_channels = 256
  v.ch = 128
  v.ch_mult = (1, 1, 2, 2, 4)  # (1, 2, 2, 4) is VQ-8.
  v.num_res_blocks = 2  # Per encoder level; the release's decoder has one more per level.
  v.norm_groups = 32
  v.norm_eps = 1e-6
  v.dropout = 0.0
  v.image_size = 256
  v.dtype = "float32"  # Compute dtype of the convolutions; quantization always runs in fp32.
  v.param_dtype = "float32"
  # Quantizer losses, as in LlamaGen: codebook_weight * |sg(z) - e|^2 + commit_beta * |z - sg(e)|^2
  # + entropy_loss_ratio * (per-sample entropy - batch entropy) of softmax(-distance / temperature).
  v.commit_beta = 0.25
  v.codebook_weight = 1.0
  v.entropy_loss_ratio = 0.0
  v.entropy_temperature = 0.01
  return v


def sample_config() -> ml_collections.ConfigDict:
  """`python -m npp_jax.main --mode=sample`: class-conditional samples (npp_jax.sample.sample_and_save)."""
  s = ml_collections.ConfigDict()
  s.checkpoint = ""  # A training workdir, its checkpoints/ folder, or a converted checkpoint (required).
  s.use_ema = False  # Take the run's EMA weights (an error if the run kept none).
  s.vq_checkpoint = ""  # A converted VQ checkpoint (config.vq); "" writes codes only, no images.
  s.num_images = 50000  # Any count: the last batch is padded to batch_size and trimmed.
  s.classes = ()  # Class ids, cycled over the samples; () cycles all classes (50 each for 50k of 1000).
  s.cfg_scale = 2.0  # GPT-B's best (NPP.md); release_config sets each size's. 1 turns guidance off.
  s.cfg_interval = -1  # -1 guides every token; n >= 0 guides tokens 0 .. n + 1 only, as the release.
  s.temperature = 1.0
  s.top_k = 0  # 0 = off; 1 = greedy.
  s.top_p = 1.0  # 1.0 = off.
  s.seed = 0
  s.batch_size = 64  # Global images per step (a multiple of the device count); one shard file per step.
  s.dtype = "auto"  # Compute dtype: "auto" is float32 on CPU (bf16 decode measured 1.4x slower there),
  #                   model.dtype elsewhere; or one of float32 / bfloat16 / float16.
  s.grid_rows = 4  # PNG: one row per class (sample.classes, else classes 0, 1, ...), at most this many
  s.grid_cols = 8  # rows of this many images.
  return s


def demo_config(smoke: bool = False) -> ml_collections.ConfigDict:
  """configs/demo.py: VQ + NPP GPT + next-token baseline on 5000 MNIST digits (npp_jax.demo).

  32x32 digits through a VQ with one downsampling -> 16x16 codes, so k = 4, 2, 1 apply as on ImageNet
  256. Sized for <= 10 minutes on 2 CPU cores; smoke=True shrinks every stage to seconds for the tests.
  """
  c = base_config()
  c.vq.ch, c.vq.ch_mult, c.vq.num_res_blocks = 32, (1, 2), 1
  c.vq.z_channels, c.vq.norm_groups = 32, 8
  c.vq.codebook_size, c.vq.codebook_embed_dim = 256, 8
  c.vq.image_size = 32

  c.model.name = "custom"
  c.model.n_layer, c.model.n_head, c.model.dim = 3, 4, 96
  c.model.multiple_of = 32
  c.model.vocab_size, c.model.num_classes = c.vq.codebook_size, 10
  c.model.grid = (16, 16)
  c.model.dtype = "float32"  # CPU: bf16 matmuls are slower than fp32 there.
  c.model.token_dropout = c.model.resid_dropout = c.model.ffn_dropout = 0.05

  c.train.epochs = 12
  c.train.global_batch_size = 64
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 200
  c.optim.lr, c.optim.end_lr = 2e-3, 2e-4
  c.optim.warmup_epochs = 0.5
  c.mesh.shape = (-1, 1, 1)

  c.sample.num_images = 500  # 50 per digit: enough for a stable Frechet distance in 64 features.
  c.sample.batch_size = 100
  c.sample.cfg_scale = 2.0
  c.sample.grid_cols = 10

  c.demo = ml_collections.ConfigDict()
  c.demo.baseline = True  # Also train the next-token baseline with equal epochs and compare.
  c.demo.classifier_epochs = 6
  c.demo.grid_cols = 10  # Samples per class row in the PNG grids.
  if smoke:
    c.model.n_layer, c.model.dim = 1, 32
    c.train.epochs = 4
    c.train.global_batch_size = 250
    c.train.log_every_steps = 1
    c.sample.num_images, c.sample.batch_size = 100, 100
    c.demo.classifier_epochs = 1
  return c
