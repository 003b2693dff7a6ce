"""The perceiver-style resampler of MiniCPM-V, shrunk: a fixed set of learned queries
cross-attends to the vision features (plus a 2D sin-cos position embedding) and is
projected to the language model's width.

As in the real model, `query` and `proj` are bare `nn.Parameter`s held directly on the
module (not inside a child module), and `pos_embed` is a non-persistent buffer computed in
`__init__`: it is not in the checkpoint, so a loader must rebuild it (the model's
`_init_weights` does).
"""

import math

import torch
from torch import nn


def sincos_1d(dim, positions):
    """[len(positions), dim]: sin of positions * frequencies, then cos."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim, size):
    """[h, w, dim] 2D sin-cos position embedding: half the channels for h, half for w."""
    h, w = size
    grid_h = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w)
    grid_w = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w)
    emb = torch.cat([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], dim=1)
    return emb.view(h, w, dim).float()


class Resampler(nn.Module):
    """[B, L, kv_dim] vision features -> [B, num_queries, embed_dim]."""

    def __init__(self, num_queries, embed_dim, num_heads, kv_dim, max_size=(8, 8)):
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.max_size = tuple(max_size)

        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        if kv_dim != embed_dim:
            self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        else:
            self.kv_proj = nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        self.register_buffer("pos_embed", self.compute_pos_embed(), persistent=False)

    def compute_pos_embed(self):
        return sincos_2d(self.embed_dim, self.max_size)

    def forward(self, x, tgt_size=None):
        """x: [B, L, kv_dim], the patches of each crop row-major; tgt_size: the crops' grid of
        patches (high, wide) with high * wide == L, square by default. Plain ints, not a
        tensor, so the forward runs on meta tensors too."""
        batch, length = x.shape[0], x.shape[1]
        if tgt_size is None:
            side = math.isqrt(length)
            tgt_size = (side, side)
        h, w = tgt_size
        if h * w != length or h > self.max_size[0] or w > self.max_size[1]:
            raise ValueError(f"{length} patches do not make a {h}x{w} grid within {self.max_size}")
        pos = self.pos_embed[:h, :w, :].reshape(h * w, -1).to(x.dtype)  # [L, D]
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [L, B, D]
        q = self.ln_q(self.query)  # [Q, D]
        q = q.unsqueeze(1).repeat(1, batch, 1)  # [Q, B, D]
        out = self.attn(q, x + pos.unsqueeze(1), x, need_weights=False)[0]  # [Q, B, D]
        x = self.ln_post(out.permute(1, 0, 2))  # [B, Q, D]
        return x @ self.proj
