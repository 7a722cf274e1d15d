"""The one config schema every config file starts from: every knob a field, its default the paper's
recipe.

No recipes live here: config files under `configs/` (one per model size, `tiny.py`, `demo.py`) call
`base_config()` and change what differs. Fields that may be unset are `placeholder`s so that a
locked config still accepts them from the command line. `load` reads a config file as `--config=`
does, for code that is not the command line (tests, benchmarks, notebooks).
"""

import importlib.util
import os
import pathlib

import ml_collections
from ml_collections import config_dict

# The checkout this package runs from: relative config paths fall back to it (an editable install,
# the tests, a notebook started elsewhere). A wheel install has no configs/ here; pass absolute
# paths then.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def model_config(name: str = "GPT-B") -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  # A name from models/gpt.py MODEL_SIZES, or "custom" with n_layer / n_head / dim set (tiny
  # models).
  m.name = name
  m.n_layer = config_dict.placeholder(int)
  m.n_head = config_dict.placeholder(int)
  m.dim = config_dict.placeholder(int)
  m.n_kv_head = config_dict.placeholder(int)  # None: as many KV heads as query heads.
  m.vocab_size = 16384
  m.num_classes = 1000
  m.grid = (16, 16)  # Code grid (rows, cols): 256 px through VQ-16.
  # "class": a class label (num_classes + 1 rows, the last the null class). "text": caption features
  # [cls_token_num, caption_dim] (FLAN-T5-XL's 120 x 2048 in LlamaGen's t2i; configs/t2i.py).
  m.condition = "class"
  m.caption_dim = 2048  # Text only: width of the caption features.
  m.cls_token_num = 1  # Condition positions before the image: 1 for a class, 120 for a caption.
  m.multiple_of = 256
  m.ffn_dim_multiplier = config_dict.placeholder(float)
  m.norm_eps = 1e-5
  m.rope_base = 10000.0
  m.token_dropout = 0.1
  m.resid_dropout = 0.1
  m.ffn_dropout = 0.1
  # Label (text: the whole caption) dropped to the null one, for classifier-free guidance.
  m.class_dropout = 0.1
  m.dtype = "bfloat16"  # Compute dtype; parameters stay in param_dtype.
  m.param_dtype = "float32"
  m.scan_layers = False
  m.remat = "none"  # "none" | "full" | "dots" (save matmul outputs only).
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()

  # Coarse-to-fine schedule (NPP.md 5). Either the release's (patch_level, epoch_rate) over
  # train.epochs, or explicit stages ((k, epochs), ...) that then define the run's length.
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
  c.optim.warmup_epochs = (
    5.0  # Paper appendix (the release's code default is 1); restarts every stage.
  )
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
  c.train.init_from = (
    ""  # A checkpoint directory whose parameters start this run (converted weights).
  )
  c.train.profile = False
  c.train.peak_flops_per_device = (
    0.0  # For MFU where the device is not in chips.CHIPS (0: look up).
  )
  # Held-out k = 1 NLL and class information (eval/ in TensorBoard) at the end of every stage and,
  # when > 0, every eval_every_steps steps; on the first eval_batches batches of data.eval_split (0
  # batches: no eval).
  c.train.eval_every_steps = 0
  c.train.eval_batches = 16
  # Several processes agree every N steps on stopping for a SIGTERM (one host round trip each time).
  c.train.preemption_sync_every_steps = 10

  c.data = ml_collections.ConfigDict()
  c.data.path = (
    ""  # Directory of the code data set (npp_jax.data.code_dataset); required for training.
  )
  c.data.worker_count = 0
  c.data.shuffle_seed = 0
  c.data.eval_split = (
    ""  # "": "test" or else "validation", whichever the data set has (neither: no eval).
  )

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
  c.vq_train = vq_train_config()
  c.extract = extract_config()
  c.evaluate = evaluate_config()
  c.compile = compile_config()
  return c


def compile_config() -> ml_collections.ConfigDict:
  """`--mode=compile` (npp_jax.jobs.compile): every program of the run compiled for a TPU slice."""
  p = ml_collections.ConfigDict()
  # GENERATION:AxB (v5e, v6e) or GENERATION:AxBxC (v5p): "v5e:2x2", "v5p:4x4x4", "v6e:8x8".
  p.topology = ""
  p.headroom = 0.1  # Fraction of each chip's HBM kept free: a program fits in (1 - headroom) x HBM.
  # () compiles every program of the run; or names: train_k4, train_k2, train_k1 (the schedule's k),
  # eval, extract_encode.
  p.programs = ()
  p.num_examples = (
    1_281_167  # Images per epoch for the schedule and the epoch estimate (ImageNet train).
  )
  return p


def evaluate_config() -> ml_collections.ConfigDict:
  """`--mode=evaluate` (npp_jax.jobs.evaluate): FID, sFID, IS, precision and recall as the ADM
  evaluator."""
  e = ml_collections.ConfigDict()
  e.samples = (
    ""  # ADM npz, arr_0 uint8 [N, H, W, 3]: what --mode=sample writes (samples/samples_N.npz).
  )
  # An ADM reference npz (images and/or mu, sigma, mu_s, sigma_s), a statistics npz this mode wrote,
  # or a data set ("digits", a TFDS name or directory, an image folder) whose statistics are then
  # cached. Set in --mode=sample, it scores the images just sampled.
  e.reference = ""
  e.reference_split = "train"  # Data set references only, as reference_num_images and data_dir.
  e.reference_num_images = 50000  # The split's first images.
  e.data_dir = ""
  e.image_size = (
    256  # Data set references are centre-cropped to this (ADM's crop), as the samples are.
  )
  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (converted once into WORKDIR/inception), or
  # that params directory. Nothing is downloaded.
  e.inception = ""
  e.preprocess = "adm"  # "adm": the TF graph's resize and scaling; "pytorch_fid": pytorch-fid's.
  e.resize_to = (
    299  # Inception input size; 299 gives the published features (smaller: smoke tests only).
  )
  e.batch_size = (
    256  # Global images per feature step and per cached shard (a multiple of the devices).
  )
  e.num_samples = (
    0  # 0: every image of evaluate.samples; n: the first n (and the samples per every_steps).
  )
  # > 0: training samples num_samples images (config.sample's settings, sample.seed every time)
  # every this many steps and at its end, and logs eval/fid, sfid, inception_score, precision,
  # recall (in memory; needs sample.vq_checkpoint, evaluate.reference and evaluate.inception). 0:
  # off.
  e.every_steps = 0
  e.fid_method = (
    "sqrtm"  # "sqrtm": the evaluator's scipy.linalg.sqrtm; "eigh": same value, faster on CPU.
  )
  e.neighbours = 3  # k of the precision / recall manifolds.
  e.is_split_size = 5000  # Inception Score splits (10 for 50,000 samples).
  e.distance_block = 10000  # Rows and columns per precision / recall distance block.
  return e


def vq_config() -> ml_collections.ConfigDict:
  """LlamaGen's VQ-16 tokenizer (NPP.md, "The VQ-16 tokenizer"): the released checkpoint's
  architecture."""
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
  """`python -m npp_jax.main --mode=sample`: class-conditional samples (npp_jax.jobs.sample)."""
  s = ml_collections.ConfigDict()
  s.checkpoint = (
    ""  # A training workdir, its checkpoints/ folder, or a converted checkpoint (required).
  )
  s.use_ema = False  # Take the run's EMA weights (an error if the run kept none).
  s.vq_checkpoint = ""  # A converted VQ checkpoint (config.vq); "" writes codes only, no images.
  s.num_images = 50000  # Any count: the last batch is padded to batch_size and trimmed.
  # Class ids, cycled over the samples; () cycles all classes (50 each for 50k of 1000).
  s.classes = ()
  s.cfg_scale = (
    2.0  # GPT-B's best (NPP.md); configs/<size>.py set each size's. 1 turns guidance off.
  )
  s.cfg_interval = (
    -1
  )  # -1 guides every token; n >= 0 guides tokens 0 .. n + 1 only, as the release.
  s.temperature = 1.0
  s.top_k = 0  # 0 = off; 1 = greedy.
  s.top_p = 1.0  # 1.0 = off.
  # Text models (model.condition="text"; configs/t2i.py sets LlamaGen's cfg_scale 7.5, top_k 1000):
  # either a prompts file (UTF-8, one prompt a line) encoded by the T5 folder text_encoder, or
  # caption_features, a folder of LlamaGen's T5 features 0.npy .. N-1.npy, float32 (1, L, dim).
  # Each caption is sampled images_per_caption times; sample.num_images and classes are unused.
  s.prompts = ""
  s.text_encoder = ""
  s.caption_features = ""
  s.images_per_caption = 1
  s.seed = 0
  s.batch_size = (
    64  # Global images per step (a multiple of the device count); one shard file per step.
  )
  s.dtype = (
    "auto"  # Compute dtype: "auto" is float32 on CPU (bf16 decode measured 1.4x slower there),
  )
  #                   model.dtype elsewhere; or one of float32 / bfloat16 / float16.
  s.grid_rows = (
    4  # PNG: one row per class (sample.classes, else classes 0, 1, ...), at most this many
  )
  s.grid_cols = 8  # rows of this many images.
  return s


def vq_train_config() -> ml_collections.ConfigDict:
  """`--mode=train_vq` (npp_jax.jobs.train_vq): a VQ of config.vq's architecture trained on images.

  Reconstruction (L2, optionally L1) plus the quantizer's codebook and commitment losses; LlamaGen's
  perceptual and adversarial losses are not part of this trainer. Defaults are LlamaGen's VQ recipe.
  """
  t = ml_collections.ConfigDict()
  # "digits" (npp_jax.data.digits, the demo), a TFDS name prepared under data_dir (e.g.
  # "imagenet2012"), a prepared TFDS directory, or an image folder root/<split>/<class>/*.{png,jpg}
  # (TFDS ImageFolder).
  t.dataset = "imagenet2012"
  t.data_dir = ""  # TFDS data_dir for a TFDS name; "" is TFDS's default (~/tensorflow_datasets).
  t.split = "train"
  t.steps = 400_000  # About 40 ImageNet epochs at batch 128.
  t.batch_size = (
    128  # Global images per step (a multiple of the data-parallel size and of the processes).
  )
  t.lr = 1e-4  # Constant.
  t.b1 = 0.9
  t.b2 = 0.95
  t.weight_decay = 0.05  # AdamW, only on >= 2-D weights (kernels and the codebook).
  t.grad_clip = 1.0  # Global-norm clip; 0 turns it off.
  t.l2_weight = 1.0  # Reconstruction: l2_weight * mean((x - x')^2) + l1_weight * mean(|x - x'|).
  t.l1_weight = 0.0
  t.random_flip = True  # Horizontal flip of half the training images (the release's augmentation).
  t.log_every_steps = 100
  t.checkpoint_every_steps = 5000
  t.keep_checkpoints = 3
  t.seed = 0
  t.num_threads = 0  # Host threads decoding and resizing images; 0: min(16, CPU count).
  return t


def extract_config() -> ml_collections.ConfigDict:
  """`--mode=extract` (npp_jax.jobs.extract): a data set's images -> a code data set
  (npp_jax.data.code_dataset)."""
  e = ml_collections.ConfigDict()
  e.dataset = (
    "imagenet2012"  # As vq_train.dataset: "digits", a TFDS name or directory, an image folder.
  )
  e.data_dir = ""
  e.split = "train"  # One split per run (digits: train / test / all).
  # The release's augmentations (LlamaGen extract_codes_c2i): "tencrop" resizes the short side to
  # int(crop_range * image_size), centre-crops that square and takes its 4 corner and centre crops
  # and those of its mirror image (n_aug 10); "flip": the centre crop and its mirror (2); "none":
  # the
  # crop (1).
  e.aug = "tencrop"
  e.crop_range = 1.1  # Ten-crop only; the release uses 1.1 (1.05 is its other setting).
  e.batch_size = (
    64  # Global images per step and per temporary shard; every step encodes n_aug x this.
  )
  e.vq_checkpoint = (
    ""  # A converted (npp_jax.convert --kind=vq) or train_vq'd (WORKDIR/vq) VQ; required.
  )
  e.output = ""  # Code data set directory; "" is WORKDIR/codes.
  e.keep_shards = False  # Keep WORKDIR/extract_tmp/<split> after the data set is written.
  e.num_threads = 0  # Host threads decoding and cropping images; 0: min(16, CPU count).
  # Text to image: a caption code data set (npp_jax.data.captions) from LlamaGen's image + caption
  # index (a .jsonl file, or a folder of them: {"image_path": ..., "text": [...]} a line), captions
  # encoded by the Hugging Face T5 folder text_encoder (LlamaGen: flan-t5-xl). "": class codes.
  e.captions = ""
  e.caption_key = "text"  # The field holding the caption (or a list of them) in each line.
  e.caption_index = 0  # Which caption when the field holds a list (LAION-COCO's: 0 is BLIP's).
  e.text_encoder = ""  # The T5 folder: config.json, spiece.model, safetensors or a .bin.
  e.text_dtype = "bfloat16"  # T5's parameter and compute dtype (LlamaGen runs it in bf16).
  return e


def config_arg(arg: str | None, *accepted: str) -> str:
  """A config file's argument (`--config=FILE:ARG`), "" for none; a word it does not know is an
  error."""
  arg = arg or ""
  if arg and arg not in accepted:
    raise ValueError(
      f"unknown config argument {arg!r}; expected "
      + (f"none or one of {', '.join(map(repr, accepted))}" if accepted else "none")
    )
  return arg


def load_module(path: str | os.PathLike):
  """A Python file by path: config files and their shared helper (configs/ is not a package)."""
  p = pathlib.Path(path)
  if not p.is_absolute() and not p.exists():
    p = REPO_ROOT / p
  if not p.is_file():
    raise ValueError(
      f"config file {str(path)!r} not found (relative paths: from {os.getcwd()} or {REPO_ROOT})"
    )
  spec = importlib.util.spec_from_file_location(f"npp_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(spec: str) -> ml_collections.ConfigDict:
  """The config `--config=SPEC` gives the command line, unlocked: "configs/b.py" or
  "configs/b.py:runlocal"."""
  path, *arg = spec.split(":", 1)
  return load_module(path).get_config(*arg)
