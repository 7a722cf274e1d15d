"""A small PyTorch reference of the released GPT and VQ tokenizer, written from NPP.md for parity
tests.

The GPT is class-conditional (c2i) or, with condition="text", LlamaGen's text-to-image model (t2i):
caption features through `cls_embedding.cap_proj` (fc1, tanh GELU, fc2), a null caption buffer
`cls_embedding.uncond_embedding`, cls_token_num condition positions and a caption padding mask
(NPP.md, "Text to image").

Parameter names and shapes are those of the PyTorch release (LlamaGen, and NPP's fork for the patch
training path), so a `state_dict()` of these modules is a checkpoint in the released layout.
Everything runs in fp32 NCHW / [B, S, D] as the release does; nothing here is used by the package
itself.
"""

import math

import torch
from torch import nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# GPT.


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
  hidden = int(2 * 4 * dim / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * math.ceil(hidden / multiple_of)


def rope_table_2d(rows: int, cols: int, head_dim: int, base: float = 10000.0, n_cond: int = 1):
  """[n_cond + rows*cols, hd/2, 2] (cos, sin); the first hd/4 pairs follow the row, the rest the
  column."""
  quarter = head_dim // 4
  inv = base ** (-torch.arange(0, quarter, dtype=torch.float64) * 4.0 / head_dim)
  row_angles = torch.outer(torch.arange(rows, dtype=torch.float64), inv)  # [rows, hd/4]
  col_angles = torch.outer(torch.arange(cols, dtype=torch.float64), inv)  # [cols, hd/4]
  grid = torch.cat(
    [
      row_angles[:, None, :].expand(rows, cols, quarter),
      col_angles[None, :, :].expand(rows, cols, quarter),
    ],
    dim=-1,
  )
  table = torch.stack([grid.cos(), grid.sin()], dim=-1).reshape(rows * cols, head_dim // 2, 2)
  # The release gives condition positions cos = sin = 0: their queries and keys become zero.
  return torch.cat([torch.zeros(n_cond, head_dim // 2, 2, dtype=torch.float64), table]).float()


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
  """x [B, S, H, hd]: rotate interleaved pairs (x[2j], x[2j+1]) by table [S, hd/2, 2]."""
  pairs = x.float().reshape(*x.shape[:-1], -1, 2)
  cos = table[None, : x.shape[1], None, :, 0]
  sin = table[None, : x.shape[1], None, :, 1]
  a, b = pairs[..., 0], pairs[..., 1]
  return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(3).type_as(x)


class RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
  def __init__(self, dim: int, n_head: int, n_kv_head: int):
    super().__init__()
    self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
    self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
    self.wo = nn.Linear(dim, dim, bias=False)

  def forward(self, x, table, mask=None):
    b, s, d = x.shape
    nq, nkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
    q, k, v = self.wqkv(x).split([nq, nkv, nkv], dim=-1)
    q = rotate(q.view(b, s, self.n_head, self.head_dim), table)
    k = rotate(k.view(b, s, self.n_kv_head, self.head_dim), table)
    v = v.view(b, s, self.n_kv_head, self.head_dim)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rep = self.n_head // self.n_kv_head
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is None:
      o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # Boolean [B, 1, S, S]: True where a query reads a key.
      o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.wo(o.transpose(1, 2).reshape(b, s, d))


class FeedForward(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.w1 = nn.Linear(dim, hidden, bias=False)
    self.w3 = nn.Linear(dim, hidden, bias=False)
    self.w2 = nn.Linear(hidden, dim, bias=False)

  def forward(self, x):
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
  def __init__(self, dim, n_head, n_kv_head, hidden, eps):
    super().__init__()
    self.attention_norm = RMSNorm(dim, eps)
    self.attention = Attention(dim, n_head, n_kv_head)
    self.ffn_norm = RMSNorm(dim, eps)
    self.feed_forward = FeedForward(dim, hidden)

  def forward(self, x, table, mask=None):
    x = x + self.attention(self.attention_norm(x), table, mask)
    return x + self.feed_forward(self.ffn_norm(x))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes: int, dim: int):
    super().__init__()
    self.embedding_table = nn.Embedding(
      num_classes + 1, dim
    )  # Last row: the null class of guidance.

  def forward(self, labels):
    return self.embedding_table(labels)[:, None, :]


class CaptionMLP(nn.Module):
  def __init__(self, caption_dim: int, dim: int):
    super().__init__()
    self.fc1 = nn.Linear(caption_dim, dim, bias=False)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(dim, dim, bias=False)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
  """Caption features [B, T, C] -> [B, T, D]; rows in `drop` take the null caption (a buffer)."""

  def __init__(self, caption_dim: int, dim: int, token_num: int):
    super().__init__()
    self.cap_proj = CaptionMLP(caption_dim, dim)
    self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

  def forward(self, caption, drop=None):
    if drop is not None:
      caption = torch.where(drop[:, None, None], self.uncond_embedding, caption)
    return self.cap_proj(caption)


def caption_mask(valid: torch.Tensor, seq_len: int) -> torch.Tensor:
  """valid [B, T] (1 at caption tokens) -> bool [B, 1, S, S]: lower-triangular, padded text columns
  zeroed for every row, then the diagonal set to 1."""
  b, t = valid.shape
  mask = torch.tril(torch.ones(seq_len, seq_len)).repeat(b, 1, 1)
  mask[:, :, :t] = mask[:, :, :t] * valid[:, None, :].float()
  eye = torch.eye(seq_len)
  return (mask * (1 - eye) + eye).bool()[:, None]


class GPT(nn.Module):
  """LlamaGen GPT (class or text condition), NPP patch input; output position i predicts patch i."""

  def __init__(
    self,
    n_layer,
    n_head,
    dim,
    vocab_size,
    num_classes,
    grid,
    n_kv_head=None,
    multiple_of=256,
    ffn_dim_multiplier=None,
    norm_eps=1e-5,
    rope_base=10000.0,
    condition="class",
    caption_dim=2048,
    cls_token_num=1,
  ):
    super().__init__()
    self.grid, self.head_dim, self.rope_base = tuple(grid), dim // n_head, rope_base
    self.cls_token_num = cls_token_num
    hidden = ffn_hidden(dim, multiple_of, ffn_dim_multiplier)
    self.tok_embeddings = nn.Embedding(vocab_size, dim)
    if condition == "text":
      self.cls_embedding = CaptionEmbedder(caption_dim, dim, cls_token_num)
    else:
      self.cls_embedding = LabelEmbedder(num_classes, dim)
    self.layers = nn.ModuleList(
      TransformerBlock(dim, n_head, n_kv_head or n_head, hidden, norm_eps) for _ in range(n_layer)
    )
    self.norm = RMSNorm(dim, norm_eps)
    self.output = nn.Linear(dim, vocab_size, bias=False)

  def patch_embeddings(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """tokens [B, h*w] -> mean embedding of every k x k block, blocks in raster order [B, n, D]."""
    h, w = self.grid
    emb = self.tok_embeddings(tokens)
    b, _, d = emb.shape
    blocks = emb.view(b, h // k, k, w // k, k, d).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, (h // k) * (w // k), k * k, d).mean(dim=2)

  def forward(
    self, tokens: torch.Tensor, cond: torch.Tensor, patch_size: int = 1, valid=None, drop=None
  ):
    """tokens [B, h*w] long, cond: labels [B] or captions [B, T, C] (valid [B, T]: 1 at caption
    tokens; drop [B]: rows given the null caption) -> logits [B, (h/k)*(w/k), V] fp32."""
    h, w = self.grid
    k, t = patch_size, self.cls_token_num
    patches = self.patch_embeddings(tokens, k)
    prefix = self.cls_embedding(cond) if t == 1 else self.cls_embedding(cond, drop)
    x = torch.cat([prefix, patches[:, :-1]], dim=1)
    table = rope_table_2d(h // k, w // k, self.head_dim, self.rope_base, n_cond=t)[: x.shape[1]]
    mask = None if valid is None else caption_mask(valid, x.shape[1])
    for layer in self.layers:
      x = layer(x, table, mask)
    return self.output(self.norm(x)).float()[:, t - 1 :]

  def group_targets(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """tokens [B, h*w] -> [B, n, k*k]: the tokens of each block, blocks and tokens in raster
    order."""
    h, w = self.grid
    b = tokens.shape[0]
    blocks = tokens.view(b, h // k, k, w // k, k).permute(0, 1, 3, 2, 4)
    return blocks.reshape(b, (h // k) * (w // k), k * k)

  def patch_loss(
    self, tokens: torch.Tensor, cond: torch.Tensor, k: int, valid=None, drop=None
  ) -> torch.Tensor:
    """The release's loss: each position's logits repeated k^2 times, cross-entropy vs the next
    patch."""
    logits = self.forward(tokens, cond, k, valid, drop)
    v = logits.shape[-1]
    repeated = logits.unsqueeze(2).expand(-1, -1, k * k, -1).reshape(-1, v)
    return F.cross_entropy(repeated, self.group_targets(tokens, k).reshape(-1))


# --------------------------------------------------------------------------------------------------
# VQ tokenizer.


def _norm(channels: int, groups: int = 32):
  return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
  def __init__(self, cin: int, cout: int, groups: int):
    super().__init__()
    self.norm1 = _norm(cin, groups)
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2 = _norm(cout, groups)
    self.dropout = nn.Dropout(0.0)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(self.dropout(F.silu(self.norm2(h))))
    if hasattr(self, "nin_shortcut"):
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  def __init__(self, c: int, groups: int):
    super().__init__()
    self.norm = _norm(c, groups)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x)
    q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # [B, hw, C]
    k = self.k(y).reshape(b, c, h * w)  # [B, C, hw]
    v = self.v(y).reshape(b, c, h * w)
    attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # [B, hw (query), hw (key)]
    out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
    return x + self.proj_out(out)


class Downsample(nn.Module):
  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, z_channels, groups):
    super().__init__()
    self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
    self.conv_blocks = nn.ModuleList()
    cin = ch
    for i, mult in enumerate(ch_mult):
      level = nn.Module()
      level.res, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks):
        level.res.append(ResnetBlock(cin, ch * mult, groups))
        cin = ch * mult
        if i == len(ch_mult) - 1:
          level.attn.append(AttnBlock(cin, groups))
      if i < len(ch_mult) - 1:
        level.downsample = Downsample(cin)
      self.conv_blocks.append(level)
    self.mid = nn.ModuleList(
      [ResnetBlock(cin, cin, groups), AttnBlock(cin, groups), ResnetBlock(cin, cin, groups)]
    )
    self.norm_out = _norm(cin, groups)
    self.conv_out = nn.Conv2d(cin, z_channels, 3, padding=1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.conv_blocks:
      for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    for block in self.mid:
      h = block(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, z_channels, groups):
    super().__init__()
    cin = ch * ch_mult[-1]
    self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
    self.mid = nn.ModuleList(
      [ResnetBlock(cin, cin, groups), AttnBlock(cin, groups), ResnetBlock(cin, cin, groups)]
    )
    self.conv_blocks = nn.ModuleList()
    for i, mult in enumerate(reversed(ch_mult)):
      level = nn.Module()
      level.res, level.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        level.res.append(ResnetBlock(cin, ch * mult, groups))
        cin = ch * mult
        if i == 0:
          level.attn.append(AttnBlock(cin, groups))
      if i < len(ch_mult) - 1:
        level.upsample = Upsample(cin)
      self.conv_blocks.append(level)
    self.norm_out = _norm(cin, groups)
    self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

  def forward(self, z):
    h = self.conv_in(z)
    for block in self.mid:
      h = block(h)
    for level in self.conv_blocks:
      for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
  def __init__(self, n_e: int, e_dim: int):
    super().__init__()
    self.embedding = nn.Embedding(n_e, e_dim)
    # Released checkpoints carry this usage buffer; loaders must ignore it.
    self.register_buffer("codebook_used", torch.zeros(65536))

  def forward(self, z):
    """z [B, e, h, w] -> (codes [B, h, w], normalised code vectors [B, e, h, w])."""
    z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
    flat = z.reshape(-1, z.shape[-1])
    emb = F.normalize(self.embedding.weight, dim=-1)
    dist = (flat**2).sum(1, keepdim=True) + (emb**2).sum(1) - 2 * flat @ emb.t()
    codes = dist.argmin(1)
    z_q = emb[codes].view(z.shape).permute(0, 3, 1, 2)
    return codes.view(z.shape[:-1]), z_q


class VQModel(nn.Module):
  def __init__(
    self,
    codebook_size=16384,
    codebook_embed_dim=8,
    z_channels=256,
    ch=128,
    ch_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    norm_groups=32,
  ):
    super().__init__()
    self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, norm_groups)
    self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, norm_groups)
    self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim)
    self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

  def encode(self, images):
    """images [B, 3, H, W] -> (codes [B, h, w], code vectors [B, e, h, w])."""
    return self.quantize(self.quant_conv(self.encoder(images)))

  def decode_codes(self, codes):
    """codes [B, h, w] -> images [B, 3, H, W]."""
    emb = F.normalize(self.quantize.embedding.weight, dim=-1)
    return self.decoder(self.post_quant_conv(emb[codes].permute(0, 3, 1, 2)))


def randomize_(module: nn.Module, seed: int) -> nn.Module:
  """Every parameter random (norm scales around 1) so no zero-initialised weight hides a mapping
  error.

  Matrices and kernels get std 1/sqrt(fan_in) so activations keep their scale through deep stacks.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise / math.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)
  return module
