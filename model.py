"""
VTP tokenizer: every network of the tokenizer, the shared config tree, and the runtime every stage uses.

"Towards Scalable Pre-training of Visual Tokenizers for Generation" (VTP, arXiv 2512.13687). "Method §N" refers to the
README's Method section.
A ViT encoder trained with CLIP + self-supervised (DINOv2-style) + reconstruction losses, a 64-channel
bottleneck at stride 16, and a ViT pixel decoder. This file holds, in this order:

  1. the networks: encoder (`VisionTransformer`), `PixelDecoder`, `TextTransformer`, `DINOHead`, and the
     `VTP` module whose tensor names match the released checkpoints;
  2. the one dataclass config that every stage shares, its presets and the typed `--key=value` parser;
  3. plumbing: the runtime layer every stage uses (distributed setup and collectives, no-ops in one process; mixed
     precision, `amp_setup`; per-step generators; the log writer and non-finite check, `Tracker`; atomic
     checkpoints and the one checkpoint loader, `load_checkpoint`), then checkpoint I/O: `load_official_vtp` (with
     a from-scratch safetensors reader), the export to the released format, and `load_vtp` for our checkpoints.
"""


import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# -----------------------------------------------------------------------------
# Building blocks (Method §2-3)


def swiglu_hidden(width, mlp_hidden=0):
    """SwiGLU hidden size: int(4*D*2/3) rounded up to a multiple of 8 (1024 / 2048 / 2736 for S / B / L)."""
    if mlp_hidden:
        return mlp_hidden
    h = int(4 * width * 2 / 3)
    return (h + 7) // 8 * 8


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight only (no bias), eps 1e-5 (Method §2)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.type_as(x)  # in x's dtype: under autocast no fp32 copy of the tokens


class RopeEmbedding(nn.Module):
    """
    2D axial RoPE of DINOv3 as released (Method §2). head_dim/4 periods `base^(2i/(head_dim/2))`; patch centres
    `(k + 0.5)/H`, `(k + 0.5)/W` mapped to [-1, 1]; angles `2π·coord/period` for y then x (head_dim/2 values), tiled
    twice to head_dim. Everything runs in `dtype` (bf16 in the released models, whose `periods` buffer is bf16).
    forward(H, W) -> (sin, cos), each (H*W, head_dim).
    """

    def __init__(self, head_dim, base=100.0, dtype="bf16"):
        super().__init__()
        assert head_dim % 4 == 0, "RoPE needs head_dim divisible by 4"
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        i = torch.arange(head_dim // 4, dtype=self.dtype)
        self.register_buffer("periods", base ** (2 * i / (head_dim // 2)), persistent=True)

    def forward(self, H, W):
        dd = dict(device=self.periods.device, dtype=self.dtype)
        periods = self.periods.to(self.dtype)  # a loaded fp32 buffer still computes in the chosen dtype
        coords_h = torch.arange(0.5, H, **dd) / H  # (H,)
        coords_w = torch.arange(0.5, W, **dd) / W  # (W,)
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # (HW, 2)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # (HW, 2, hd/4)
        angles = angles.flatten(1, 2).tile(2)  # (HW, hd)
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x):
    """[a, b] -> [-b, a] over the last dim."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x, rope):
    """Rotate the last N' tokens of x (B, h, N, hd) by rope = (sin, cos) of shape (N', hd); prefix tokens ([CLS])
    are left as they are. The rotation runs in the rope dtype (bf16 as released), then casts back."""
    sin, cos = rope
    n_prefix = x.shape[-2] - sin.shape[-2]
    dtype = x.dtype
    prefix, xr = x[..., :n_prefix, :], x[..., n_prefix:, :].to(sin.dtype)
    xr = xr * cos + rotate_half(xr) * sin
    return torch.cat([prefix, xr.to(dtype)], dim=-2)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv Linear (bias), optional QK-norm, RoPE, SDPA, output Linear (bias)."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hd = dim // num_heads
        self.q_norm = RMSNorm(hd) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd) if qk_norm else nn.Identity()

    def forward(self, x, rope=None):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, h, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm comes before RoPE
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax scale head_dim^-0.5
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), all with bias (Method §2)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def drop_path_scales(n_blocks, batch, p, training, generator=None, device=None):
    """
    Sample-level stochastic depth for a whole forward (Method §2): (n_blocks, 2, B, 1, 1) scales, one per residual
    branch (attention, MLP) of each block and sample: 0 (the branch is dropped) with probability p, else 1/(1-p).
    None when p is 0 or not training. All draws happen here, before the blocks, from `generator` (training passes
    one seeded by (seed, rank, step), see `step_generator`): a compiled block never meets a generator (no graph
    break) and a checkpointed block recomputes with the same draws.
    """
    if p == 0.0 or not training:
        return None
    keep = torch.rand(n_blocks, 2, batch, 1, 1, device=device, generator=generator) >= p
    return keep.float() / (1.0 - p)


class Block(nn.Module):
    """Pre-norm ViT block: x + Attn(norm1(x)), then x + SwiGLU(norm2(x)). RMSNorm in the encoder (no LayerScale),
    LayerNorm (eps 1e-6) in the pixel decoder. `scale` (2, B, 1, 1): the stochastic-depth scales of the two
    branches (`drop_path_scales`), or None."""

    def __init__(self, dim, num_heads, mlp_hidden, norm="rmsnorm", qk_norm=False):
        super().__init__()
        make_norm = (lambda: RMSNorm(dim)) if norm == "rmsnorm" else (lambda: nn.LayerNorm(dim, eps=1e-6))
        self.norm1 = make_norm()
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = make_norm()
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x, rope=None, scale=None):
        if scale is None:
            x = x + self.attn(self.norm1(x), rope)
            return x + self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x), rope) * scale[0]
        return x + self.mlp(self.norm2(x)) * scale[1]


def run_blocks(blocks, x, *args, scales=None, checkpoint=False, each=None):
    """
    x through `blocks` in order, each called as blk(x, *args[, scales[i]]). checkpoint: activation checkpointing
    (`train.grad_checkpoint`): each block keeps only its input for the backward and recomputes the rest there, so
    the gradients are those without it at one more forward of compute. each(i, x): called after block i.
    """
    for i, blk in enumerate(blocks):
        extra = (scales[i],) if scales is not None else ()
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, *args, *extra, use_reentrant=False,
                                                  preserve_rng_state=False)  # nothing in a block draws
        else:
            x = blk(x, *args, *extra)
        if each is not None:
            each(i, x)
    return x


def set_grad_checkpointing(module, on=True):
    """Turn activation checkpointing of every block stack in `module` (encoder, pixel decoder, text tower) on/off."""
    for m in module.modules():
        if hasattr(m, "grad_checkpoint"):
            m.grad_checkpoint = on
    return module


def compile_blocks(module, backend="inductor"):
    """
    Regional compilation (`run.compile`): every transformer block of `module` compiled in place (nn.Module.compile,
    so state-dict keys keep their names), instead of one graph of the whole step. Blocks of one kind share their
    code, so each distinct input shape compiles once and every block reuses it; the rest of the step (crops, heads,
    losses) runs eagerly. Returns `module`.
    """
    # one graph per (input shape, grad mode, stochastic depth on/off) of a block: S/B/L meet about 10 (three student
    # passes, teacher, decoder, previews), more than dynamo's default limit of 8 graphs per function
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for m in module.modules():
        if isinstance(m, (Block, TextBlock)):
            m.compile(backend=backend, dynamic=False)  # static shapes: every shape is known after the first step
    return module


def init_vit_weights(module):
    """Linear: trunc-normal std 0.02, bias 0 (Method §2)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# -----------------------------------------------------------------------------
# Encoder (Method §2)


class PatchEmbed(nn.Module):
    """Conv2d(3 -> D, kernel = stride = patch): (B, 3, H, W) -> (B, H/p * W/p, D) and the grid (H/p, W/p)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        bound = math.sqrt(1.0 / (3 * patch_size * patch_size))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x):
        x = self.proj(x)  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2), x.shape[-2:]  # (B, h*w, D)


class VisionTransformer(nn.Module):
    """
    The VTP encoder ("trunk" in the released checkpoints): patch embedding, [CLS], RMSNorm pre-norm blocks with 2D
    RoPE on patch tokens, final RMSNorm, and a bias-free bottleneck Linear(D -> latent_dim) on the normed patches.
    `forward_features` takes one image batch or a list of crop batches of different sizes (DINOv2 multi-crop),
    each with an optional iBOT mask (B, N) bool whose True patches are replaced by `mask_token`.
    """

    def __init__(self, cfg: "EncoderConfig"):
        super().__init__()
        D = cfg.width
        self.patch_size = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        self.rope_embed = RopeEmbedding(D // cfg.num_heads, cfg.rope_base, cfg.rope_dtype)
        hidden = swiglu_hidden(D, cfg.mlp_hidden)
        self.blocks = nn.ModuleList([Block(D, cfg.num_heads, hidden, "rmsnorm", cfg.qk_norm) for _ in range(cfg.depth)])
        self.norm = RMSNorm(D)
        self.feature_bottleneck = nn.Linear(D, cfg.latent_dim, bias=False)
        self.grad_checkpoint = False  # set_grad_checkpointing
        self.apply(init_vit_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    def prepare_tokens(self, x, masks=None):
        """(B, 3, H, W) -> tokens (B, 1 + N, D) with masked patches replaced, and the patch grid (h, w)."""
        x, grid = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1), grid

    def forward_features(self, x, masks=None, drop_path_rate=0.0, n_last=0, generator=None):
        """
        x: (B, 3, H, W) or a list of such batches (sizes may differ); masks: None, (B, N) bool, or a list aligned
        with x. Returns a dict {"cls": (B, D), "patches": (B, N, D), "grid": (h, w)} of final-normed tokens (a list
        of dicts for a list input). With n_last > 0 the dict also has "layers": the final-normed tokens after each
        of the last n_last blocks, as (B, 1 + N, D) tensors. Stochastic depth draws from `generator` (drop_path).
        """
        if isinstance(x, (list, tuple)):
            masks = masks if masks is not None else [None] * len(x)
            return [self.forward_features(xi, mi, drop_path_rate, n_last, generator) for xi, mi in zip(x, masks)]
        x, (h, w) = self.prepare_tokens(x, masks)
        rope = self.rope_embed(h, w)
        scales = drop_path_scales(len(self.blocks), x.shape[0], drop_path_rate, self.training, generator, x.device)
        layers = []

        def keep_last(i, tokens):
            if i >= len(self.blocks) - n_last:
                layers.append(self.norm(tokens))

        x = run_blocks(self.blocks, x, rope, scales=scales, checkpoint=self.grad_checkpoint, each=keep_last)
        x = self.norm(x)  # (B, 1 + N, D)
        out = {"cls": x[:, 0], "patches": x[:, 1:], "grid": (h, w)}
        if n_last:
            out["layers"] = layers
        return out

    def latents(self, patches, grid):
        """Normed patch tokens (B, N, D) -> latent map (B, latent_dim, h, w) through the bottleneck."""
        z = self.feature_bottleneck(patches)  # (B, N, C)
        return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *grid)  # (B, C, h, w)


# -----------------------------------------------------------------------------
# Pixel decoder (Method §3)


class PixelDecoder(nn.Module):
    """
    1x1 Conv(latent -> D) -> tokens (no [CLS]) -> 2D RoPE ViT blocks with LayerNorm -> final LayerNorm ->
    1x1 Conv(D -> 3*p*p) -> PixelShuffle(p). (B, C, h, w) -> (B, 3, h*p, w*p) in the normalized input space.
    """

    def __init__(self, cfg: "DecoderConfig", latent_dim, patch_size, rope_dtype="bf16", rope_base=100.0):
        super().__init__()
        D = cfg.width
        self.proj_in = nn.Conv2d(latent_dim, D, kernel_size=1)
        self.rope_embed = RopeEmbedding(D // cfg.num_heads, rope_base, rope_dtype)
        hidden = swiglu_hidden(D, cfg.mlp_hidden)
        self.blocks = nn.ModuleList([Block(D, cfg.num_heads, hidden, "layernorm") for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.proj_out = nn.Conv2d(D, 3 * patch_size * patch_size, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(patch_size)
        self.grad_checkpoint = False  # set_grad_checkpointing
        self.apply(init_vit_weights)

    def forward(self, z, drop_path_rate=0.0, generator=None):
        B, _, h, w = z.shape
        x = linear_1x1(self.proj_in, z.flatten(2).transpose(1, 2))  # (B, h*w, D)
        rope = self.rope_embed(h, w)
        scales = drop_path_scales(len(self.blocks), B, drop_path_rate, self.training, generator, x.device)
        x = run_blocks(self.blocks, x, rope, scales=scales, checkpoint=self.grad_checkpoint)
        x = linear_1x1(self.proj_out, self.norm(x))  # (B, h*w, 3*p*p)
        return self.pixel_shuffle(x.transpose(1, 2).reshape(B, -1, h, w))  # (B, 3, h*p, w*p)


def linear_1x1(conv, tokens):
    """A 1x1 conv (weights as released) applied as the Linear over channels it is: tokens (B, N, C_in) ->
    (B, N, C_out). On a (B, C, h, w) view of tokens (channels-last memory) the conv itself returns, from about
    16 images on, a channels-last weight gradient, which DDP warns about ("grad strides do not match bucket view
    strides") and copies every step; the Linear's gradient has the parameter's layout."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


# -----------------------------------------------------------------------------
# Text encoder (Method §4): CLIP's causal pre-LN transformer, tensor names as in OpenCLIP / the released models.


class TextAttention(nn.Module):
    """Causal multi-head attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(B, N, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, hd)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(x.transpose(1, 2).reshape(B, N, D))


class TextBlock(nn.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x)) with a GELU MLP (c_fc, c_proj)."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = TextAttention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The stack of text blocks (`text_transformer.resblocks.N` in the released checkpoints)."""

    def __init__(self, cfg: "TextConfig"):
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.grad_checkpoint = False  # set_grad_checkpointing

    def forward(self, x):
        return run_blocks(self.resblocks, x, checkpoint=self.grad_checkpoint)


# -----------------------------------------------------------------------------
# DINO head (Method §5) and the teacher's EMA


class DINOHead(nn.Module):
    """
    MLP (D -> hidden -> hidden -> bottleneck, GELU) -> L2-normalize -> weight-normalized Linear(bottleneck -> K,
    no bias) whose weight norm is fixed to 1 (the direction is learned, the magnitude is not). (B, D) -> (B, K).
    """

    def __init__(self, in_dim, cfg: "HeadConfig"):
        super().__init__()
        layers, dim = [], in_dim
        for _ in range(cfg.nlayers - 1):
            layers += [nn.Linear(dim, cfg.hidden_dim), nn.GELU()]
            dim = cfg.hidden_dim
        layers.append(nn.Linear(dim, cfg.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(init_vit_weights)
        self.last_layer = nn.Linear(cfg.bottleneck_dim, cfg.num_prototypes, bias=False)
        nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)  # (B, bottleneck)
        w = F.normalize(self.last_layer.weight, dim=-1)  # (K, bottleneck), each prototype at norm 1
        with torch.autocast(x.device.type, enabled=False):  # fp32: bf16 steps a cosine near 1 by 0.004, 0.1 at τ 0.04
            return F.linear(x.float(), w.float())  # (B, K)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter, in fp32."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    assert len(t_params) == len(s_params), "teacher and student must have the same parameters"
    torch._foreach_lerp_(t_params, [p.detach().float() for p in s_params], 1.0 - momentum)  # one fused pass


# -----------------------------------------------------------------------------
# The VTP module: the public API used by every later stage.


class VTP(nn.Module):
    """
    The VTP tokenizer (Method §2-4). Attribute names follow the released checkpoints, so `state_dict()` keys are
    those of `model.safetensors` (trunk.*, visual_proj, pixel_decoder.*, token_embedding, positional_embedding,
    text_transformer.*, ln_final, text_projection, logit_scale). Images are ImageNet-normalized (B, 3, H, W);
    `decode` returns images in that same space.

        encode(images)                      -> latents (B, latent_dim, H/p, W/p)
        decode(latents)                     -> images (B, 3, H, W)
        forward(images)                     -> reconstructions (B, 3, H, W)
        image_features(images, normalize)   -> (B, embed_dim)  CLIP image embedding of the normed [CLS]
        text_features(tokens, normalize)    -> (B, embed_dim)  CLIP text embedding at the end-of-text token
        features(images)                    -> {"cls": (B, D), "patches": (B, N, D)}  final-normed tokens
        intermediate_layers(images, n)      -> n dicts like features(), for the last n blocks (last block last)
    """

    def __init__(self, cfg: "Config"):
        super().__init__()
        e, t = cfg.encoder, cfg.text
        self.patch_size, self.latent_dim = e.patch_size, e.latent_dim
        self.latent_features = e.latent_features
        self.trunk = VisionTransformer(e)
        feat_dim = e.latent_dim if e.latent_features else e.width
        self.visual_proj = nn.Linear(feat_dim, t.embed_dim, bias=False)
        self.pixel_decoder = PixelDecoder(cfg.decoder, e.latent_dim, e.patch_size, e.rope_dtype, e.rope_base)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.text_transformer = TextTransformer(t)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, t.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.loss.logit_scale_init))
        self._init_text(t)
        nn.init.trunc_normal_(self.visual_proj.weight, std=0.02)

    def _init_text(self, t):
        """CLIP's text-tower init: embeddings std 0.02 / 0.01, attention and MLP scaled by width and depth."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = t.width ** -0.5 * (2 * t.depth) ** -0.5
        for blk in self.text_transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=t.width ** -0.5)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.out_proj.bias)
            nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * t.width) ** -0.5)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    # --- image side ---
    def encode(self, images, drop_path_rate=0.0, generator=None):
        """(B, 3, H, W) -> latents (B, latent_dim, H/p, W/p): encoder -> final norm -> bottleneck."""
        f = self.trunk.forward_features(images, drop_path_rate=drop_path_rate, generator=generator)
        return self.trunk.latents(f["patches"], f["grid"])

    def decode(self, latents, drop_path_rate=0.0, generator=None):
        """(B, latent_dim, h, w) -> images (B, 3, h*p, w*p) in the normalized input space."""
        return self.pixel_decoder(latents, drop_path_rate, generator)

    def forward(self, images):
        """Reconstruct: decode(encode(images))."""
        return self.decode(self.encode(images))

    def semantic_tokens(self, f):
        """The tokens CLIP and SSL read: full-width normed tokens (as released), or the latent (ablation)."""
        if not self.latent_features:
            return f["cls"], f["patches"]
        bottleneck = self.trunk.feature_bottleneck
        return bottleneck(f["cls"]), bottleneck(f["patches"])

    def image_features(self, images, normalize=True, drop_path_rate=0.0, generator=None):
        """CLIP image embedding: visual_proj on the normed [CLS]. (B, 3, H, W) -> (B, embed_dim)."""
        f = self.trunk.forward_features(images, drop_path_rate=drop_path_rate, generator=generator)
        cls, _ = self.semantic_tokens(f)
        x = self.visual_proj(cls)
        return F.normalize(x, dim=-1) if normalize else x

    def text_features(self, tokens, normalize=True):
        """CLIP text embedding: (B, context_length) ids -> (B, embed_dim), pooled at the end-of-text token, which
        is the largest id in each row (argmax pooling as in CLIP)."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # (B, L, W)
        x = self.ln_final(self.text_transformer(x))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, W)
        x = x @ self.text_projection  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def features(self, images):
        """Final-normed full-width tokens: {"cls": (B, D), "patches": (B, N, D)}."""
        f = self.trunk.forward_features(images)
        return {"cls": f["cls"], "patches": f["patches"]}

    def intermediate_layers(self, images, n=1):
        """Final-normed tokens after each of the last n blocks, as a list of {"cls", "patches"} (last block last)."""
        f = self.trunk.forward_features(images, n_last=n)
        return [{"cls": x[:, 0], "patches": x[:, 1:]} for x in f["layers"]]


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model: VTP):
    """Parameter counts of the parts of a VTP, as the paper reports them."""
    text = [model.token_embedding, model.text_transformer, model.ln_final]
    n_text = sum(count_parameters(m) for m in text) + model.positional_embedding.numel()
    n_text += model.text_projection.numel()
    return {"encoder": count_parameters(model.trunk), "decoder": count_parameters(model.pixel_decoder),
            "text": n_text, "visual_proj": count_parameters(model.visual_proj), "total": count_parameters(model)}


# -----------------------------------------------------------------------------
# Config: one dataclass tree shared by all stages. Defaults are the CPU `tiny` preset. Each section belongs to one
# part: encoder / decoder / text / head are the tokenizer's network; loss / data / optim / train its pre-training
# (pretrain.py); dit / sample the DiT and its ODE sampler (train_dit.py); eval the evaluations (evaluate.py); run the
# device, precision, compile and seed of whichever script runs.


@dataclass
class EncoderConfig:
    image_size: int = 32  # training resolution; any multiple of patch_size works at inference
    patch_size: int = 4  # stride of the tokenizer (16 for the released models)
    width: int = 128  # token width D
    depth: int = 4  # number of transformer blocks
    num_heads: int = 2  # attention heads (head_dim = width / num_heads, must be a multiple of 4 for RoPE)
    mlp_hidden: int = 0  # SwiGLU hidden size; 0 = int(4*D*2/3) rounded up to a multiple of 8
    latent_dim: int = 4  # bottleneck channels (64 for f16d64); tiny: 3*4*4/4 = 12x compression like the paper
    qk_norm: bool = False  # RMSNorm on q and k before RoPE (paper mentions it; released models have none)
    rope_dtype: str = "bf16"  # dtype of RoPE angles and rotation: "bf16" (as released) or "fp32"
    rope_base: float = 100.0  # RoPE period base: period_i = base^(2i/(head_dim/2))
    drop_path_clip: float = 0.0  # sample-level stochastic depth of the CLIP forward
    drop_path_ssl: float = 0.0  # ... of the SSL student forward (the teacher always uses 0)
    drop_path_rec: float = 0.0  # ... of the reconstruction forward
    latent_features: bool = False  # ablation: CLIP/SSL read the bottleneck latent instead of full-width tokens


@dataclass
class DecoderConfig:
    width: int = 128  # token width of the pixel decoder
    depth: int = 3  # number of blocks
    num_heads: int = 2  # attention heads
    mlp_hidden: int = 0  # SwiGLU hidden size; 0 = int(4*D*2/3) rounded up to a multiple of 8


@dataclass
class TextConfig:
    vocab_size: int = 1024  # BPE vocabulary (49408 for the CLIP vocabulary); end-of-text must be the largest id
    context_length: int = 32  # tokens per caption, start and end tokens included (77 for CLIP)
    width: int = 128  # transformer width
    depth: int = 2  # transformer layers
    num_heads: int = 2  # attention heads
    mlp_ratio: float = 4.0  # GELU MLP hidden = mlp_ratio * width
    embed_dim: int = 128  # shared image-text embedding size (text_projection and visual_proj outputs)
    tokenizer: str = "bpe"  # "bpe" = train a byte-level BPE on the captions; or a path to bpe_simple_vocab_16e6.txt.gz


@dataclass
class HeadConfig:
    # tiny [ours]: K / bottleneck = 256 / 16 = 16, large as in DINOv2 (65536 / 256), so the MLP has few
    # prototype-poor directions to hide in (scripts/results/experiments.md)
    hidden_dim: int = 256  # DINO head MLP hidden size (2048 for S/B/L)
    bottleneck_dim: int = 16  # L2-normalized bottleneck before the prototypes (256 for S/B/L)
    num_prototypes: int = 256  # K, the number of prototypes (65536 for S/B/L)
    nlayers: int = 3  # MLP layers before the bottleneck projection counts as the last one
    freeze_last_layer_steps: int = 100  # prototypes get no update for this many steps (DINOv2: 1 "epoch" = 1250)


@dataclass
class LossConfig:
    lambda_rec: float = 2.0  # weight of L_rec (paper and S/B/L: 0.1; tiny [ours]: its L_rec is L1 alone on 8 of 64)
    lambda_ssl: float = 0.25  # weight of L_ssl (paper and S/B/L: 1; tiny [ours]: less SSL pull on CLIP's shape)
    lambda_clip: float = 1.0  # weight of L_clip (paper: 0 or 1)
    l1_weight: float = 1.0  # weight of L1 inside L_rec
    lpips_weight: float = 1.0  # weight of LPIPS inside L_rec (disabled when no weights are given)
    lpips_vgg_path: str = ""  # path to ImageNet VGG16 weights (vgg16-397923af.pth layout)
    lpips_lin_path: str = ""  # path to LPIPS v0.1 linear heads (lin0.model.1.weight ... lin4...)
    # "auto": LPIPS when both weight paths are given, else L1 alone (tiny); "on": the weights are required (S/B/L:
    # the paper's L_rec), a missing path stops the run at start-up; "off": L1 alone, said in the log
    lpips: str = "auto"
    koleo_weight: float = 0.1  # weight of the KoLeo regularizer inside L_ssl
    student_temp: float = 0.1  # student softmax temperature
    teacher_temp: float = 0.02  # teacher temperature after warm-up (S/B/L: 0.07, DINOv2; tiny [ours]: sharper targets)
    warmup_teacher_temp: float = 0.02  # teacher temperature at step 0 (S/B/L: 0.04)
    teacher_temp_warmup_frac: float = 0.3  # fraction of steps to warm the teacher temperature up
    # teacher probabilities: "sinkhorn" (Sinkhorn-Knopp; S/B/L) or "centering" (DINO's; tiny [ours]: over 32 teacher
    # rows and K = 256, Sinkhorn-Knopp's targets depend on the batch-mates and stayed near log K)
    teacher_norm: str = "centering"
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations
    center_momentum: float = 0.9  # EMA momentum of the centre ("centering" only)
    logit_scale_init: float = 2.659260036932778  # ln(1/0.07)
    logit_scale_max: float = 4.605170185988092  # ln(100): logit_scale is clamped to [0, this]
    gan_weight: float = 0.5  # stage 2: lambda_adv multiplying the adaptive weight
    gan_start: int = 0  # stage 2: step at which the discriminator and the GAN loss start
    gan_max_adaptive: float = 1e4  # stage 2: clamp of the adaptive weight
    disc_channels: int = 64  # stage 2: PatchGAN base channels
    disc_layers: int = 3  # stage 2: PatchGAN strided conv layers


@dataclass
class DataConfig:
    dataset: str = "builtin"  # "builtin" | "folder" | "jsonl" | "tar" | "imagenet"
    path: str = ""  # root folder, JSONL file, or tar brace pattern (not used by builtin)
    val_path: str = ""  # validation data of the same kind (builtin uses its val split)
    holdout: int = 1000  # without val_path: training samples held back as validation data (data.held_out); 0 = none
    # tiny [ours]: 64, not 32: CLIP only learned shape here with twice the in-batch negatives
    batch_size: int = 64  # B: image-text pairs per process per micro-step (all feed CLIP)
    ssl_batch_size: int = 16  # B_ssl: random subset of the B samples that feeds SSL (paper 16k/4k; tiny: 2*16 SK rows)
    rec_batch_size: int = 8  # B_rec: random subset that feeds reconstruction (paper 16k/2k)
    num_local_crops: int = 4  # DINOv2 local crops per image (2 global crops always; 8 for S/B/L)
    # crop scales: DINOv2's (0.32, 1) / (0.05, 0.32) for S/B/L; at 32 px a 5% crop is a 7-px patch of one colour,
    # so tiny keeps more of the object in every view [ours]
    global_crop_scale: tuple = (0.5, 1.0)  # RandomResizedCrop scale range of global crops
    local_crop_scale: tuple = (0.2, 0.5)  # RandomResizedCrop scale range of local crops
    local_crop_size: int = 0  # local crop side; 0 = patch * round(grid * 7/16) (112 for 256 px)
    # SSL colour augmentation, DINOv2's: jitter applied with p 0.8, then grayscale with p 0.2 (S/B/L)
    color_jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # max brightness, contrast, saturation change and hue shift (turns)
    # probability that an SSL crop is turned to grayscale (S/B/L: 0.2; tiny [ours]: 1, what two crops of a built-in
    # scene share is then the outline, not the colour)
    grayscale_p: float = 1.0
    mask_prob: float = 0.5  # fraction of global crops that get an iBOT mask
    mask_ratio: tuple = (0.1, 0.5)  # iBOT mask ratios, spread linearly across the batch
    mask_min_patches: int = 4  # smallest block of a BEiT-style mask
    mask_aspect: tuple = (0.3, 3.33)  # aspect-ratio range of mask blocks
    num_workers: int = 0  # data-loader worker processes per rank
    shuffle_buffer: int = 0  # tar shards: samples in each reader's shuffle buffer (0 = stored order)
    shuffle_shards: int = 1  # tar shards: shards each reader has open at once, interleaved into the buffer
    builtin_train_size: int = 1_000_000  # number of distinct built-in training scenes
    builtin_val_size: int = 1000  # number of built-in validation scenes
    seed: int = 0  # data seed


@dataclass
class OptimConfig:
    # peak lr at a global batch of lr_ref_batch, scaled by sqrt(global_batch / lr_ref_batch) (S/B/L: 5e-4 at 4096;
    # tiny [ours]: 2e-3 at 64, so the 1000 steps get through CLIP's shape phase)
    lr: float = 2e-3
    lr_ref_batch: int = 64  # reference global CLIP batch of `lr`
    betas: tuple = (0.9, 0.98)  # AdamW betas
    eps: float = 1e-6  # AdamW eps
    weight_decay: float = 0.05  # AdamW weight decay (none on norms, biases, tokens, logit_scale)
    warmup_frac: float = 0.15  # linear warm-up, fraction of max_steps (S/B/L: 0.05; tiny [ours]: 2e-3 needs 150 steps)
    min_lr_frac: float = 0.01  # cosine decays to this fraction of the peak lr
    grad_clip: float = 3.0  # max global gradient norm (0 = off)
    # lr multiplier of the text tower (S/B/L: 1, as in the paper; tiny [ours]: 0.3, or a text tower at full lr erases
    # the shape word from the captions before the image tower can see shape)
    text_lr_mult: float = 0.3
    teacher_momentum: float = 0.992  # teacher EMA momentum at step 0 (cosine to teacher_momentum_final)
    teacher_momentum_final: float = 1.0  # teacher EMA momentum at the last step
    stage2_lr: float = 1e-4  # stage 2 (decoder + discriminator) AdamW lr


@dataclass
class RunConfig:
    """Where and how any stage runs (pretrain.py, train_dit.py, evaluate.py): one section, read by each script."""
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    amp: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp16" (with a GradScaler) | "fp32"
    compile: bool = False  # torch.compile each transformer block (regional: one graph per block shape, reused)
    compile_backend: str = "inductor"  # torch.compile backend ("eager" / "aot_eager" to debug a compile problem)
    dist_timeout_min: int = 60  # process-group timeout (minutes): the other ranks wait this long for rank 0's save
    seed: int = 0  # initial weights and every torch.Generator (with rank and step); evaluation: probe and samples


@dataclass
class TrainConfig:
    stage: int = 1  # 1 = joint pre-training, 2 = decoder GAN fine-tuning
    out_dir: str = "runs/pretrain"  # checkpoints, config.json, metrics.jsonl and previews go here
    init_from: str = ""  # stage 2: stage-1 checkpoint (file or folder); empty = latest in out_dir
    max_steps: int = 1000  # optimizer steps (tiny: about 10 minutes on 2 CPU cores)
    # k micro-batches of data.batch_size per optimizer step whose gradients add up to that of their union: CLIP by
    # cached gradients and teacher targets over all k (README Method §6); global batch = batch_size * processes * k
    accum_steps: int = 1
    grad_checkpoint: bool = False  # recompute each transformer block in the backward (S/B/L: on); same gradients
    keep_ckpts: int = 3  # newest ckpt_*.pt kept in out_dir (0 = all)
    stage2_batch_size: int = 0  # stage 2: images per process per step (0 = data.batch_size)
    log_every: int = 20  # steps between log lines / metrics.jsonl rows
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)
    preview_every: int = 250  # steps between reconstruction preview PNGs
    resume: bool = False  # continue from the latest checkpoint in out_dir
    export: str = ""  # at the end: also write the tokenizer here in the released format (config.json + safetensors)
    export_dtype: str = "fp32"  # "fp32" | "bf16" weights of the export


@dataclass
class DiTConfig:
    model: str = "tiny"  # DiT size preset: tiny | S | B | L | XL
    tokenizer: str = ""  # stage-1/2 tokenizer checkpoint (file or folder) whose latents the DiT models
    out_dir: str = "runs/dit"  # latents cache, checkpoints, metrics and sample grids
    patch_size: int = 1  # DiT patch over the latent grid (1 or 2)
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    batch_size: int = 32  # per-process batch
    max_steps: int = 4000  # optimizer steps (tiny CPU default, ~13 min on 2 cores; the paper: 100k at batch 1024)
    lr: float = 0.0  # AdamW lr (constant); 0 = the preset's (2e-4 as in the paper; 1e-3 for tiny)
    betas: tuple = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.0  # AdamW weight decay
    ema_decay: float = 0.0  # EMA of the DiT weights; 0 = the preset's (0.9999 as in the paper; 0.995 for tiny)
    t_mu: float = -0.5  # logit-normal timestep mean (-0.75 for L)
    t_sigma: float = 1.25  # logit-normal timestep std (1.0 for L)
    cos_weight: float = 1.0  # weight of the cosine term of the flow-matching loss
    num_cache_images: int = 10000  # images to encode into the latent cache (builtin / cap for folders)
    stats_images: int = 10000  # unflipped latents for the per-channel mean/std
    log_every: int = 20  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints
    sample_every: int = 1000  # steps between sample grids
    grad_clip: float = 1.0  # max global gradient norm (0 = off) [ours]
    keep_ckpts: int = 2  # newest ckpt_*.pt kept in out_dir (0 = all)
    shard_size: int = 10000  # images per latent-cache shard file
    grid_classes: int = 8  # sample grids: classes shown (spread over all classes), one row each
    grid_per_class: int = 4  # sample grids: samples per class
    grid_cfg_scale: float = 4.0  # sample grids: guidance scale (a visual check, as in DiT's figures; 1 = none)


@dataclass
class SampleConfig:
    """The flow-matching ODE sampler (Method §7), used by the DiT's sample grids and saved with its checkpoints, and
    `train_dit.py sample`."""
    num_steps: int = 250  # ODE steps
    sampler: str = "euler"  # "euler" | "heun"
    time_shift: float = 0.075  # s of the shifted time grid t' = s*t / (1 + (s-1)*t)
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = none)
    cfg_interval: tuple = (0.0, 1.0)  # t-range where guidance is applied
    ckpt: str = ""  # sample: DiT checkpoint file or folder (empty = latest in dit.out_dir)
    num_samples: int = 64  # sample: images to generate
    batch_size: int = 32  # sample: images per forward (per process)
    out: str = ""  # sample: folder for the PNGs and samples.npz (empty = dit.out_dir/samples)


@dataclass
class EvalConfig:
    inception_path: str = ""  # pt_inception-2015-12-05-6726825d.pth; without it FD_vtp replaces FID
    out: str = "runs/eval/results.json"  # where the results JSON goes
    batch_size: int = 64  # images per forward
    num_images: int = 1000  # images for zero-shot / probe / recon / reference statistics
    num_gen: int = 1000  # generated samples for gFID / FD_vtp
    knn_k: int = 20  # k of the k-NN classifier
    knn_temperature: float = 0.07  # k-NN votes are weighted by exp(cosine / T) (DINO)
    ckpt: str = ""  # tokenizer: checkpoint file, run folder (latest ckpt_*.pt) or released folder (--ckpt)
    dit_ckpt: str = ""  # gen: DiT checkpoint file or folder (--dit_ckpt); `all` skips gen without it or gen_npz
    gen_npz: str = ""  # gen: .npz of uint8 images (N, H, W, 3) under arr_0 or images, evaluated instead of sampling
    gen_steps: int = 0  # gen: ODE steps when sampling; 0 = the DiT checkpoint's sample.num_steps
    ref_stats: str = ""  # gen: reference statistics .npz; empty = cached next to eval.out
    class_names: str = ""  # zero-shot: text file, one class name per line in label order; empty = the dataset's
    templates: str = "auto"  # zero-shot prompts: auto (simple for builtin, CLIP's 80 otherwise) | clip | simple
    # probe / k-NN features: cls_patch (normed [CLS] of the last blocks + mean patch; DINOv2's linear probe) | cls
    # (normed [CLS] of the last blocks alone; DINO's k-NN) | latent (the pooled bottleneck latent)
    probe_features: str = "cls_patch"
    probe_blocks: int = 1  # probe: number of last blocks whose [CLS] is concatenated (1 or 4)
    probe_lrs: tuple = (0.001, 0.01, 0.1, 1.0)  # probe: learning-rate grid (best on val is reported)
    probe_epochs: int = 100  # probe: epochs over the cached features
    probe_batch_size: int = 256  # probe: mini-batch size
    recon_grid: int = 8  # recon: image pairs in the side-by-side PNG
    fd_ckpt: str = ""  # FD_vtp judge: tokenizer whose features it uses; empty = eval.ckpt (gen: the DiT's tokenizer)
    judge_dir: str = "runs/judge"  # built-in data: where the CNN judge (accuracy, FD_judge) is saved once trained
    judge_seed: int = 0  # built-in data: the judge's training seed
    judge_images: int = 20_000  # built-in data: training scenes of the judge
    judge_epochs: int = 6  # built-in data: epochs of the judge's training
    cfg_scale: float = 0.0  # gen: guidance scale of the DiT samples; 0 = the DiT checkpoint's sample.cfg_scale


@dataclass
class Config:
    preset: str = "tiny"  # the preset these values started from
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Rebuild a Config from `to_dict()` output; unknown keys (from newer versions) are ignored."""
        return _from_dict(cls, d)


def _from_dict(cls, d):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            v = _from_dict(f.type, v)
        elif f.type in (tuple, "tuple"):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def _released_preset(name, width, depth, heads, drop_path_ssl, batch):
    """S/B/L as released (Method §2-4): 256 px, patch 16, f16d64, CLIP text tower, decoder mirrors the encoder.
    batch: the per-GPU CLIP batch B (B_ssl = B/4, B_rec = B/8 as in the paper's 16k / 4k / 2k), chosen with
    `scripts/benchmark.py --memory` to stay below 72 GiB of an 80 GiB GPU with checkpointing on, as is stage 2's.
    The paper's batch itself on W GPUs: --data.batch_size=16384/(W·k) (and /4, /8) with --train.accum_steps=k, exact
    (README "Scaling up": 8 GPUs k=4 at 512 per micro-batch; 32 GPUs 512 and 128 GPUs 128 with k=1)."""
    c = Config(preset=name)
    c.encoder = EncoderConfig(image_size=256, patch_size=16, width=width, depth=depth, num_heads=heads,
                              latent_dim=64, drop_path_ssl=drop_path_ssl)
    c.decoder = DecoderConfig(width=width, depth=depth, num_heads=heads)
    # CLIP's vocabulary as released: text.tokenizer must name its merges file (pretrain.py stops at start-up without)
    c.text = TextConfig(vocab_size=49408, context_length=77, width=768, depth=12, num_heads=12, embed_dim=768,
                        tokenizer="")
    c.head = HeadConfig(hidden_dim=2048, bottleneck_dim=256, num_prototypes=65536, freeze_last_layer_steps=1250)
    # the paper's λs, DINOv2's teacher (Sinkhorn-Knopp, 0.04 -> 0.07), L_rec = L1 + LPIPS
    c.loss = LossConfig(lambda_rec=0.1, lambda_ssl=1.0, teacher_norm="sinkhorn", teacher_temp=0.07,
                        warmup_teacher_temp=0.04, lpips="on")
    c.data = DataConfig(batch_size=batch, ssl_batch_size=batch // 4, rec_batch_size=batch // 8, num_local_crops=8,
                        num_workers=8, global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32), grayscale_p=0.2,
                        shuffle_buffer=5000, shuffle_shards=4)
    c.optim = OptimConfig(lr=5e-4, lr_ref_batch=4096, warmup_frac=0.05, text_lr_mult=1.0)
    c.train = TrainConfig(max_steps=100_000, log_every=50, ckpt_every=2000, preview_every=2000, grad_checkpoint=True,
                          stage2_batch_size=128)
    return c


def _tiny_preset():
    """The CPU demonstration: the dataclass defaults, whose [ours] choices are explained beside each field."""
    return Config(preset="tiny")


PRESETS = {
    "tiny": _tiny_preset,
    "S": lambda: _released_preset("S", 384, 12, 6, 0.1, batch=768),
    "B": lambda: _released_preset("B", 768, 12, 12, 0.1, batch=768),
    "L": lambda: _released_preset("L", 1024, 24, 16, 0.2, batch=512),
}

# DiT size presets (LightningDiT / DiT naming; the DiT itself is in train_dit.py), with the defaults of `--dit.lr`
# and `--dit.ema_decay` for each size.
# The real sizes use the paper's lr 2e-4 and EMA 0.9999 (100k steps = 10 EMA time constants 1/(1 - decay)).
# tiny [ours] is for the 6k-step CPU runs: EMA 0.995 (a 200-step time constant; with 0.999 the EMA of a 2k-step run
# still weighs the zero-output initial weights by 14%) and lr 1e-3 (at batch 32 and 2e-4 the tiny DiT learns so
# slowly that its samples ignore their class for thousands of steps).
DiT_models = {
    "tiny": dict(depth=6, width=128, num_heads=2, lr=1e-3, ema_decay=0.995),
    "S": dict(depth=12, width=384, num_heads=6, lr=2e-4, ema_decay=0.9999),
    "B": dict(depth=12, width=768, num_heads=12, lr=2e-4, ema_decay=0.9999),
    "L": dict(depth=24, width=1024, num_heads=16, lr=2e-4, ema_decay=0.9999),
    "XL": dict(depth=28, width=1152, num_heads=16, lr=2e-4, ema_decay=0.9999),
}


# Fields with a closed set of valid values: checked at start-up with the choices in the message.
CHOICES = {
    "preset": tuple(PRESETS),
    "encoder.rope_dtype": ("bf16", "fp32"),
    "loss.teacher_norm": ("sinkhorn", "centering"),
    "loss.lpips": ("auto", "on", "off"),
    "run.compile_backend": ("inductor", "aot_eager", "eager"),
    "data.dataset": ("builtin", "folder", "jsonl", "tar", "imagenet"),
    "train.stage": (1, 2),
    "run.amp": ("auto", "bf16", "fp16", "fp32"),
    "run.device": ("auto", "cpu", "cuda"),
    "train.export_dtype": ("fp32", "bf16"),
    "dit.model": tuple(DiT_models),
    "dit.patch_size": (1, 2),
    "sample.sampler": ("euler", "heun"),
    "eval.templates": ("auto", "clip", "simple"),
    "eval.probe_features": ("cls_patch", "cls", "latent"),
}


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type or out of range; the message names the field."""


def _coerce(key, typ, raw):
    """Turn the string `raw` into the declared type of field `key`."""
    try:
        if typ in (bool, "bool"):
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in (int, "int"):
            return int(raw.replace("_", ""))
        if typ in (float, "float"):
            return float(raw)
        if typ in (tuple, "tuple"):
            return tuple(float(x) for x in raw.strip("()[] ").split(",") if x.strip())
        return raw
    except ValueError:
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"--{key}={raw}: expected a value of type {name}") from None


def _all_keys(obj, prefix=""):
    keys = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            keys += _all_keys(v, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def set_config_value(cfg, key, raw):
    """Set dotted `key` of `cfg` from the string `raw`, coercing to the declared type."""
    obj, parts = cfg, key.split(".")
    for p in parts[:-1]:
        sub = getattr(obj, p, None)
        if not dataclasses.is_dataclass(sub):
            obj = None
            break
        obj = sub
    names = {f.name: f for f in dataclasses.fields(obj)} if obj is not None else {}
    f = names.get(parts[-1])
    if f is None or dataclasses.is_dataclass(getattr(obj, f.name)):
        raise ConfigError(f"unknown config key --{key}; valid keys: " + ", ".join(_all_keys(cfg)))
    setattr(obj, f.name, _coerce(key, f.type, raw))


def validate_config(cfg):
    """Fail early, naming the field, on values that would break a run later."""
    def need(ok, key, why):
        if not ok:
            raise ConfigError(f"invalid config value {key}={_get(cfg, key)!r}: {why}")

    for key, choices in CHOICES.items():
        need(_get(cfg, key) in choices, key, f"valid choices are {', '.join(map(str, choices))}")
    e, d, t = cfg.encoder, cfg.decoder, cfg.text
    need(e.patch_size > 0 and e.image_size % e.patch_size == 0, "encoder.image_size",
         f"must be a positive multiple of encoder.patch_size={e.patch_size}")
    for name, sec in (("encoder", e), ("decoder", d)):
        need(sec.width > 0 and sec.num_heads > 0 and sec.width % sec.num_heads == 0, f"{name}.num_heads",
             f"must divide {name}.width={sec.width}")
        need((sec.width // sec.num_heads) % 4 == 0, f"{name}.num_heads",
             f"head_dim = width/num_heads must be a multiple of 4 for 2D RoPE (got {sec.width / sec.num_heads})")
        need(sec.depth >= 1, f"{name}.depth", "must be >= 1")
    need(t.width % t.num_heads == 0, "text.num_heads", f"must divide text.width={t.width}")
    need(t.context_length >= 2, "text.context_length", "must be >= 2 (start and end tokens)")
    need(e.latent_dim >= 1, "encoder.latent_dim", "must be >= 1")
    for key in ("encoder.drop_path_clip", "encoder.drop_path_ssl", "encoder.drop_path_rec", "dit.class_dropout"):
        need(0.0 <= _get(cfg, key) < 1.0, key, "must be in [0, 1)")
    need(0.0 <= cfg.data.mask_prob <= 1.0, "data.mask_prob", "must be in [0, 1]")
    for key in ("loss.lambda_rec", "loss.lambda_ssl", "loss.lambda_clip", "loss.l1_weight", "loss.lpips_weight",
                "loss.koleo_weight", "optim.weight_decay", "optim.grad_clip"):
        need(_get(cfg, key) >= 0, key, "must be >= 0")
    need(cfg.loss.lambda_rec + cfg.loss.lambda_ssl + cfg.loss.lambda_clip > 0, "loss.lambda_rec",
         "at least one of loss.lambda_rec, loss.lambda_ssl, loss.lambda_clip must be > 0")
    for key in ("data.batch_size", "data.ssl_batch_size", "data.rec_batch_size", "train.max_steps",
                "train.accum_steps", "train.log_every", "train.ckpt_every", "train.preview_every", "optim.lr_ref_batch",
                "dit.batch_size", "dit.max_steps", "sample.num_steps", "sample.batch_size"):
        need(_get(cfg, key) >= 1, key, "must be >= 1")
    need(cfg.data.holdout >= 0, "data.holdout", "must be >= 0")
    for key in ("data.shuffle_buffer", "train.keep_ckpts", "train.stage2_batch_size"):
        need(_get(cfg, key) >= 0, key, "must be >= 0")
    for key in ("data.shuffle_shards", "run.dist_timeout_min"):
        need(_get(cfg, key) >= 1, key, "must be >= 1")
    cj = cfg.data.color_jitter
    need(len(cj) == 4 and min(cj) >= 0 and cj[3] <= 0.5, "data.color_jitter",
         "must be four numbers brightness,contrast,saturation,hue, each >= 0, hue <= 0.5")
    need(0.0 <= cfg.data.grayscale_p <= 1.0, "data.grayscale_p", "must be in [0, 1]")
    b = cfg.data.batch_size
    need(cfg.data.ssl_batch_size <= b, "data.ssl_batch_size", f"must be <= data.batch_size={b}")
    need(cfg.data.rec_batch_size <= b, "data.rec_batch_size", f"must be <= data.batch_size={b}")
    need(cfg.data.ssl_batch_size >= 2 or cfg.loss.lambda_ssl == 0 or cfg.loss.koleo_weight == 0, "data.ssl_batch_size",
         "must be >= 2 with KoLeo on (loss.koleo_weight > 0): its nearest neighbours are searched within each "
         "process's micro-batch")
    for key in ("data.global_crop_scale", "data.local_crop_scale", "data.mask_ratio", "data.mask_aspect",
                "optim.betas", "dit.betas", "sample.cfg_interval"):
        v = _get(cfg, key)
        need(len(v) == 2 and v[0] <= v[1], key, "must be two numbers lo,hi with lo <= hi")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.text_lr_mult >= 0, "optim.text_lr_mult", "must be >= 0 (0 freezes the text tower)")
    need(0.0 < cfg.sample.time_shift, "sample.time_shift", "must be > 0")
    need(cfg.dit.lr >= 0, "dit.lr", "must be >= 0 (0 = the DiT preset's)")
    need(cfg.dit.grid_cfg_scale >= 0, "dit.grid_cfg_scale", "must be >= 0")
    need(0.0 <= cfg.dit.ema_decay < 1.0, "dit.ema_decay", "must be in [0, 1) (0 = the DiT preset's)")
    for key in ("dit.shard_size", "dit.grid_classes", "dit.grid_per_class", "sample.num_samples", "dit.stats_images",
                "eval.batch_size", "eval.knn_k", "eval.probe_blocks", "eval.probe_epochs", "eval.probe_batch_size",
                "eval.judge_epochs"):
        need(_get(cfg, key) >= 1, key, "must be >= 1")
    for key in ("dit.grad_clip", "dit.keep_ckpts", "dit.num_cache_images", "eval.cfg_scale"):
        need(_get(cfg, key) >= 0, key, "must be >= 0")
    for key in ("eval.num_images", "eval.num_gen"):
        need(_get(cfg, key) >= 2, key, "must be >= 2 (statistics need two samples)")
    need(len(cfg.eval.probe_lrs) >= 1 and min(cfg.eval.probe_lrs) >= 0, "eval.probe_lrs", "must be learning rates >= 0")
    need(cfg.eval.judge_images >= 8, "eval.judge_images", "must be >= 8")
    return cfg


def _get(cfg, key):
    for p in key.split("."):
        cfg = getattr(cfg, p)
    return cfg


def config_help(cfg, aliases=None):
    """`--help`: every key with its value in `cfg`'s preset and the comment beside its field in this file."""
    comments = {}

    def walk(obj, prefix):
        above = []  # a comment block just above a field explains it when the field line has none
        for line in inspect.getsource(type(obj)).splitlines():
            if re.match(r"\s+#", line):
                above.append(line.strip()[1:].strip())
                continue
            m = re.match(r"\s+(\w+):[^#=]*=[^#]*(?:#\s*(.*))?$", line)
            if m:
                comments[prefix + m.group(1)] = m.group(2) or " ".join(above)
            above = []
        for f in dataclasses.fields(obj):
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                walk(getattr(obj, f.name), prefix + f.name + ".")

    walk(cfg, "")
    lines = [f"usage: --key=value overrides of the shared config; preset {cfg.preset} values shown "
             f"(--preset={'|'.join(PRESETS)} picks another)"]
    if aliases:
        lines.append("aliases: " + ", ".join(f"--{k} = --{v}" for k, v in aliases.items()))
    rows = [(f"--{k}={_get(cfg, k)}", comments.get(k, "")) for k in _all_keys(cfg)]
    width = max(len(r[0]) for r in rows)
    return "\n".join(lines + [f"  {a:<{width}}  {b}".rstrip() for a, b in rows])


def parse_config(argv=None, aliases=None):
    """
    Build the Config from `--preset=NAME` (default tiny) and typed `--key=value` overrides, dotted for nested
    fields (`--encoder.depth=4`). `aliases` maps short keys to dotted ones (e.g. {"tokenizer": "dit.tokenizer"}).
    A bare `--flag` sets a bool field to True. Raises ConfigError naming the field on any bad key or value.
    `-h` / `--help` prints every key with its preset value and meaning (config_help) and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    aliases = aliases or {}
    want_help = "-h" in argv or "--help" in argv
    argv = [a for a in argv if a not in ("-h", "--help")]
    pairs = []
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value")
        key, eq, raw = arg[2:].partition("=")
        pairs.append((aliases.get(key, key), raw if eq else "true"))
    preset = "tiny"
    for key, raw in pairs:
        if key == "preset":
            preset = raw
    if preset not in PRESETS:
        raise ConfigError(f"invalid config value preset={preset!r}: valid choices are {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    if want_help:
        print(config_help(cfg, aliases))
        sys.exit(0)
    for key, raw in pairs:
        if key != "preset":
            set_config_value(cfg, key, raw)
    return validate_config(cfg)


def config_summary(cfg, where="config.json"):
    """For the start-up print: the values that differ from the preset's, as `key=value` lines (the full config is
    saved to `where`)."""
    base = PRESETS[cfg.preset]() if cfg.preset in PRESETS else Config()
    changed = [f"  {k}={_get(cfg, k)}  (preset: {_get(base, k)})" for k in _all_keys(cfg)
               if _get(cfg, k) != _get(base, k)]
    head = f"config: preset {cfg.preset}, " + (f"{len(changed)} value(s) changed" if changed else "unchanged")
    return "\n".join([f"{head} (full config in {where})"] + changed)


# =============================================================================
# Plumbing: the runtime layer every stage shares, then checkpoint I/O (released checkpoints, export, our own).
# =============================================================================

# -----------------------------------------------------------------------------
# The runtime layer of every stage: distributed setup and the collectives (no-ops in one process), mixed precision,
# per-step generators, rank-0 printing, atomic checkpoints.


def setup_distributed(device="auto", timeout_min=60):
    """
    Initialize DDP when launched by torchrun (RANK set): nccl on CUDA, gloo on CPU, with a collective timeout of
    `timeout_min` minutes (run.dist_timeout_min: long enough for rank 0 to write the largest checkpoint while the
    others wait). Returns (rank, world_size, local_rank, device). Without torchrun: (0, 1, 0, device).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is available")
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if use_cuda else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=datetime.timedelta(minutes=timeout_min))
    return rank, world_size, local_rank, dev


def amp_setup(amp, device):
    """
    The mixed precision of every stage (Method §6): amp ("auto" | "bf16" | "fp16" | "fp32", the value of run.amp)
    -> (autocast, scaler). `autocast()` opens one autocast region (a no-op in fp32); "auto" is bf16 on CUDA and
    fp32 on CPU. fp16 needs CUDA and comes with a GradScaler; otherwise scaler is None.
    """
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("invalid config value run.amp='fp16': fp16 needs CUDA (use bf16 or fp32 on CPU)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    return autocast, torch.amp.GradScaler("cuda") if amp == "fp16" else None


def step_generator(seed, rank, step, device, stream=0):
    """A generator on `device` seeded by (seed, rank, step, stream): the step number is the whole RNG state, so a
    resumed run draws exactly what an uninterrupted one would, and no draw depends on torch's global generator."""
    return torch.Generator(device=device).manual_seed((seed << 40) + (rank << 25) + (stream << 24) + step)


@contextlib.contextmanager
def seeded(seed):
    """`with seeded(seed):` around module construction. nn.Module initializers draw from torch's global generator;
    inside, that generator starts from `seed` (the same initial weights on every rank and every run), and on leaving
    it is restored, so no later draw depends on it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cleanup_distributed(barrier=True):
    """Barrier, then destroy the process group (avoids gloo aborts at exit). Delete DDP wrappers first.
    barrier=False after an error on this rank: the others may never reach a barrier, so leave at once."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t):
    """In-place sum of `t` over all processes (any shape); returns `t`. No-op in one process."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t):
    """In-place max of `t` over all processes (any shape); returns `t`. No-op in one process."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier():
    """Wait for every process; a no-op in one process."""
    if _distributed():
        dist.barrier()


def _backend_device():
    """Where collectives want their tensors: the current CUDA device under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] for a small picklable obj; [obj] in one process."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_cat(x):
    """
    Concatenate a (n_r, ...) tensor of every rank along dim 0, in rank order (n_r may differ between ranks).
    Returns `x` unchanged in one process. Rows of several tensors gathered in the same order stay aligned.
    """
    if not _distributed():
        return x
    world = dist.get_world_size()
    dev = _backend_device()
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = torch.zeros((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=dev)  # (n_max, ...)
    pad[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


# --- logs: one line per log step and metrics.jsonl, loss terms summed on the device in between ---


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or inf; the last good checkpoint is kept."""


class Tracker:
    """
    Sums loss terms on the device between log steps (no host sync per step) and remembers, per term, the first
    step at which it was not finite. `flush()` averages over processes (one all-reduce), syncs once, raises
    NonFiniteLoss naming the term and step, and returns the mean of each term since the last flush. `log()` flushes
    and writes the log line and metrics.jsonl row with the speed since the last log.
    """

    def __init__(self, world_size=1, step=0):
        self.world_size, self.sums, self.counts, self.first_bad = world_size, {}, {}, {}
        self.t0, self.step0, self.excluded = time.time(), step, 0.0

    def exclude(self, seconds):
        """Keep `seconds` spent outside the training step (sampling previews) out of the next ms/step."""
        self.excluded += seconds

    def add(self, terms, step):
        for k, v in terms.items():
            v = v.detach().float()
            if k not in self.sums:
                self.sums[k], self.counts[k], self.first_bad[k] = torch.zeros_like(v), 0, torch.full_like(v, -1)
            bad = ~torch.isfinite(v) & (self.first_bad[k] < 0)
            self.first_bad[k] = torch.where(bad, torch.full_like(v, step), self.first_bad[k])
            self.sums[k] += v
            self.counts[k] += 1

    def flush(self):
        keys = list(self.sums)
        stats = torch.stack([self.sums[k] for k in keys] + [self.first_bad[k] for k in keys])
        stats = all_reduce_sum(stats).tolist()
        sums, first_bad = stats[:len(keys)], stats[len(keys):]
        for k, s, bad in zip(keys, sums, first_bad):
            if bad > -self.world_size or not math.isfinite(s):  # -1 on every rank = never bad
                step = int(self.first_bad[k].item()) if self.first_bad[k].item() >= 0 else "an earlier step"
                raise NonFiniteLoss(f"loss term '{k}' became {self.sums[k].item()} at step {step}; "
                                    "stopping without overwriting the last good checkpoint")
        means = {k: s / max(1, self.counts[k]) / self.world_size for k, s in zip(keys, sums)}
        self.sums = {k: torch.zeros_like(s) for k, s in self.sums.items()}
        self.counts = {k: 0 for k in self.counts}
        return means

    def log(self, out_dir, bar, step, total_steps, images_per_step, lr, **extra):
        """flush(), then (rank 0) `log_step` of the means, `extra`, lr and the speed since the last log."""
        means = self.flush()  # raises NonFiniteLoss before the caller saves anything
        dt = max((time.time() - self.t0 - self.excluded) / max(1, step - self.step0), 1e-9)
        if not dist.is_initialized() or dist.get_rank() == 0:
            row = {"step": step, "total_steps": total_steps, **{k: v for k, v in means.items() if k != "grad_norm"},
                   **extra, "lr": lr, "grad_norm": means["grad_norm"], "ms_per_step": 1000 * dt,
                   "img_per_s": images_per_step / dt}
            log_step(out_dir, row, bar)
        self.t0, self.step0, self.excluded = time.time(), step, 0.0
        return means


def trim_metrics(out_dir, last_step):
    """Keep only metrics.jsonl rows up to `last_step` (0 for a fresh run): rows logged after the checkpoint a run
    resumes from, or by an earlier run in the same folder, would otherwise be mixed into this run's curve."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(rows)


def log_step(out_dir, row, bar):
    """One fixed-format log line and the same numbers appended to metrics.jsonl (rank 0 only)."""
    terms = " | ".join(f"{k} {v:.4f}" for k, v in row.items()
                       if k not in ("step", "total_steps", "lr", "grad_norm", "ms_per_step", "img_per_s"))
    line = (f"step {row['step']}/{row['total_steps']} | {terms} | lr {row['lr']:.2e} | "
            f"grad_norm {row['grad_norm']:.3f} | {row['ms_per_step']:.0f} ms/step | {row['img_per_s']:.1f} img/s")
    (bar.write if bar is not None else print)(line)
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def run_cli(main):
    """Run a script's main(); a config or data problem (ConfigError, a missing file) ends it with one line that
    names the flag, and exit code 2, instead of a traceback."""
    try:
        main()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def save_checkpoint(path, state, keep=0):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file.
    keep > 0: then delete all but the newest `keep` ckpt_*.pt of that folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    if keep:
        old = sorted(n for n in os.listdir(folder) if re.fullmatch(r"ckpt_\d+\.pt", n))
        for name in old[:-keep]:
            os.remove(os.path.join(folder, name))


class _TensorSpec:
    """A tensor's place in a broadcast state: its shape and dtype (the values follow in their own broadcast)."""

    def __init__(self, t):
        self.shape, self.dtype = tuple(t.shape), t.dtype


def _map_tensors(obj, fn):
    """obj with every tensor (or _TensorSpec) in nested dicts / lists / tuples replaced by fn(it)."""
    if torch.is_tensor(obj) or isinstance(obj, _TensorSpec):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def load_checkpoint(path, missing=None):
    """
    The one checkpoint loader of every stage, for any number of nodes. Global rank 0 resolves `path` (a file, or
    the folder's latest ckpt_*.pt: `resolve_checkpoint`) and reads it memory-mapped; every other process receives
    rank 0's dict through broadcasts (the structure, then each tensor), so nodes without a shared disk resume from
    rank 0's checkpoint and step. Returns (path, dict), or (None, None) when rank 0 finds none
    (FileNotFoundError(missing) on every rank if `missing` is given). A file rank 0 cannot read stops every rank.
    """
    state, error, found = None, None, None
    if not _distributed() or dist.get_rank() == 0:
        try:
            found = resolve_checkpoint(path, missing)
            state = torch.load(found, map_location="cpu", weights_only=True, mmap=True) if found else None
        except FileNotFoundError as e:
            error = ("missing", str(e))
        except Exception as e:  # a truncated or foreign file: every rank must hear of it, not wait for it
            error = ("unreadable", f"rank 0 cannot read checkpoint {found!r}: {type(e).__name__}: {e}")
    if not _distributed():
        if error:
            raise (FileNotFoundError if error[0] == "missing" else RuntimeError)(error[1])
        return (found, state) if state is not None else (None, None)
    box = [(error, found if state is not None else None,
            _map_tensors(state, _TensorSpec) if state is not None else None)] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    error, found, skeleton = box[0]
    if error:
        raise (FileNotFoundError if error[0] == "missing" else RuntimeError)(error[1])
    if skeleton is None:
        return None, None
    dev, src = _backend_device(), state

    def receive(spec):
        t = torch.empty(spec.shape, dtype=spec.dtype, device=dev)
        dist.broadcast(t, src=0)
        return t

    if dist.get_rank() == 0:  # send every tensor, in the same order as the others' receive
        _map_tensors(src, lambda t: dist.broadcast(t.to(dev), src=0))
        return found, state
    return found, _map_tensors(skeleton, receive)


def resolve_checkpoint(path, missing=None):
    """
    The one checkpoint resolver of every stage: the file `path` names, or the `ckpt_{step}.pt` with the largest step
    in the folder `path`. When there is none: None, or FileNotFoundError(missing) if `missing` (what to tell the
    user) is given.
    """
    found = None
    if path and os.path.isdir(path):
        steps = [(int(m.group(1)), n) for n in os.listdir(path) if (m := re.fullmatch(r"ckpt_(\d+)\.pt", n))]
        found = os.path.join(path, max(steps)[1]) if steps else None
    elif path and os.path.isfile(path):
        found = path
    if found is None and missing:
        raise FileNotFoundError(missing)
    return found


def adamw(params, device, **kwargs):
    """torch.optim.AdamW, with the fused CUDA kernel (one launch for all parameters) on CUDA devices."""
    return torch.optim.AdamW(params, fused=torch.device(device).type == "cuda", **kwargs)


# -----------------------------------------------------------------------------
# Loading: a from-scratch safetensors reader/writer, released VTP checkpoints, and our own checkpoints.

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def load_safetensors(path):
    """
    Read a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw little-endian
    tensor bytes (offsets relative to the end of the header). Returns {name: tensor}.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        buf = bytearray(data[begin:end])  # a writable copy, owned by the tensor
        t = torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]) if end > begin else torch.empty(0)
        if sys.byteorder == "big":
            t = t.view(torch.uint8).view(-1, t.element_size()).flip(-1).flatten().view(t.dtype)
        out[name] = t.to(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as .safetensors (little-endian, header padded with spaces to a multiple of 8)."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in chunks:
            f.write(b)
    os.replace(tmp, path)


def _official_mlp_hidden(width, mlp_ratio):
    """SwiGLU hidden of a released config: 2/3 of mlp_ratio*width, rounded up to a multiple of 8 (0 = default)."""
    return 0 if mlp_ratio == 4.0 else swiglu_hidden(int(width * mlp_ratio / 4))


def config_from_official(hf, tensors=None):
    """Map a released `config.json` (dict) to our Config; reject settings this implementation does not have."""
    expected = {"vision_ffn_layer": "swiglu", "vision_norm_layer": "rmsnorm", "decoder_ffn_layer": "swiglu",
                "decoder_norm_layer": "layernorm", "text_pool_type": "argmax", "text_proj_type": "linear",
                "vision_clip_feat": "cls", "text_quick_gelu": False, "text_embed_cls": False,
                "text_no_causal_mask": False, "nonscalar_logit_scale": False, "text_proj_bias": False,
                "vision_init_values": None, "decoder_init_values": None, "text_ls_init_value": None,
                "init_logit_bias": None, "decoder_use_qk_norm": False}
    for key, want in expected.items():
        if key in hf and hf[key] != want:
            raise ValueError(f"official config {key}={hf[key]!r} is not supported (this implementation has {want!r})")
    c = Config(preset="official")
    c.encoder = EncoderConfig(
        image_size=hf["image_size"], patch_size=hf["vision_patch_size"], width=hf["vision_embed_dim"],
        depth=hf["vision_depth"], num_heads=hf["vision_num_heads"], latent_dim=hf["vision_feature_bottleneck"],
        qk_norm=bool(hf.get("vision_use_qk_norm", False)),
        latent_features=not hf.get("vision_bottleneck_ae_only", True),
        mlp_hidden=_official_mlp_hidden(hf["vision_embed_dim"], hf.get("vision_mlp_ratio", 4.0)))
    c.decoder = DecoderConfig(width=hf["decoder_embed_dim"], depth=hf["decoder_depth"],
                              num_heads=hf["decoder_num_heads"])
    embed_dim = tensors["text_projection"].shape[1] if tensors is not None else hf["text_embed_dim"]
    c.text = TextConfig(vocab_size=hf["text_vocab_size"], context_length=hf["text_context_length"],
                        width=hf["text_embed_dim"], depth=hf["text_depth"], num_heads=hf["text_num_heads"],
                        mlp_ratio=hf.get("text_mlp_ratio", 4.0), embed_dim=embed_dim, tokenizer="")
    if c.text.vocab_size == 49408:
        c.text.tokenizer = "bpe_simple_vocab_16e6.txt.gz"  # the CLIP merges file; pass its real path to use it
    return c


def load_official_vtp(path, device="cpu"):
    """
    Load a released VTP checkpoint folder (config.json + model.safetensors, e.g. MiniMaxAI/VTP-Large-f16d64) into
    an equivalent `VTP` in eval mode, whatever sizes its config gives. Returns the model (its Config is model.cfg).
    """
    cfg_path, st_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"released VTP checkpoint folder {path!r} has no {os.path.basename(p)}")
    with open(cfg_path) as f:
        hf = json.load(f)
    tensors = load_safetensors(st_path)
    cfg = config_from_official(hf, tensors)
    model = VTP(cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{st_path} does not match the VTP layout: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(f"{st_path}: {name} has shape {tuple(t.shape)}, expected {tuple(own[name].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    model.cfg = cfg
    return model.to(device).eval()


# The released config.json: fields that hold the architecture we implement, with the one value each can take here.
OFFICIAL_FIXED = {
    "decoder_ffn_layer": "swiglu", "decoder_init_values": None, "decoder_norm_layer": "layernorm",
    "decoder_use_qk_norm": False, "init_logit_bias": None, "init_logit_scale": None, "model_type": "vtp",
    "nonscalar_logit_scale": False, "text_embed_cls": False, "text_ls_init_value": None, "text_no_causal_mask": False,
    "text_output_tokens": False, "text_pad_id": 0, "text_pool_type": "argmax", "text_proj_bias": False,
    "text_proj_type": "linear", "text_quick_gelu": False, "train_clip": True, "train_reconstruction": True,
    "vision_bottleneck_ae_only": True, "vision_clip_feat": "cls", "vision_ffn_layer": "swiglu",
    "vision_init_values": None, "vision_norm_layer": "rmsnorm", "vision_use_qk_norm": False}
TEXT_TOKENIZER_FILE = "text_tokenizer.json"  # our own BPE, written next to an export (the released models use CLIP's)


def official_config(cfg: Config):
    """
    Our Config -> the released `config.json` dict (the same keys as MiniMaxAI/VTP-*-f16d64). Raises ConfigError
    naming the first of our options that the released format cannot hold (the authors' code would build another
    network from it), so an export fails before anything is written.
    """
    e, d, t = cfg.encoder, cfg.decoder, cfg.text
    unsupported = [
        ("encoder.qk_norm", e.qk_norm, False), ("encoder.latent_features", e.latent_features, False),
        ("encoder.rope_dtype", e.rope_dtype, "bf16"), ("encoder.rope_base", e.rope_base, 100.0),
        ("encoder.mlp_hidden", swiglu_hidden(e.width, e.mlp_hidden), swiglu_hidden(e.width)),
        ("decoder.mlp_hidden", swiglu_hidden(d.width, d.mlp_hidden), swiglu_hidden(d.width)),
        ("text.embed_dim", t.embed_dim, t.width)]  # the released text_projection is (width, width)
    for key, value, want in unsupported:
        if value != want:
            raise ConfigError(f"cannot export {key}={value!r} in the released VTP format (it holds only {want!r})")
    return dict(sorted({
        **OFFICIAL_FIXED, "image_size": e.image_size, "vision_patch_size": e.patch_size, "vision_embed_dim": e.width,
        "vision_depth": e.depth, "vision_num_heads": e.num_heads, "vision_mlp_ratio": 4.0,
        "vision_feature_bottleneck": e.latent_dim, "decoder_embed_dim": d.width, "decoder_depth": d.depth,
        "decoder_num_heads": d.num_heads, "text_vocab_size": t.vocab_size, "text_context_length": t.context_length,
        "text_embed_dim": t.width, "text_depth": t.depth, "text_num_heads": t.num_heads,
        "text_mlp_ratio": t.mlp_ratio}.items()))


def export_official(model: VTP, cfg: Config, folder, dtype="fp32", tokenizer_state=None):
    """
    Write `folder/config.json` + `folder/model.safetensors` in the layout of the released VTP checkpoints, loadable by
    `load_official_vtp` (and by the authors' code). Weights in fp32 (default) or bf16; the RoPE `periods` stay bf16
    as released. tokenizer_state: the run's `BPETokenizer.state_dict()`; a tokenizer of our own (not CLIP's
    vocabulary) is written to folder/text_tokenizer.json, which `load_vtp` reads and the authors' code does not.
    Returns lines for the log.
    """
    hf = official_config(cfg)  # raises before anything is written
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"invalid export dtype {dtype!r}: fp32 or bf16")
    cast = torch.float32 if dtype == "fp32" else torch.bfloat16
    tensors = {}
    for name, t in model.state_dict().items():
        keep = name.endswith("rope_embed.periods") or not t.is_floating_point()
        tensors[name] = t.detach().cpu() if keep else t.detach().cpu().to(cast)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tmp = os.path.join(folder, f"config.json.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(hf, f, indent=2)
    os.replace(tmp, os.path.join(folder, "config.json"))
    notes = [f"exported {len(tensors)} tensors ({dtype}) and config.json to {folder}"]
    if cfg.encoder.patch_size != 16:  # their PixelDecoder builds a 16x16 pixel shuffle whatever the config says
        notes.append(f"note: encoder.patch_size={cfg.encoder.patch_size}: the authors' code cannot load this export "
                     "(its pixel decoder hard-codes 16x16 output patches); load_vtp / load_official_vtp here can")
    if tokenizer_state is not None and tokenizer_state.get("kind") != "clip":
        with open(os.path.join(folder, TEXT_TOKENIZER_FILE), "w") as f:
            json.dump(tokenizer_state, f)
        notes.append(f"the text tokenizer is our own BPE ({tokenizer_state['vocab_size']} ids), written to "
                     f"{TEXT_TOKENIZER_FILE}: load_vtp uses it; the authors' code knows only the CLIP vocabulary")
    return notes


def load_vtp(path, device="cpu"):
    """
    Load a tokenizer for the later stages. `path` is one of our checkpoint files (a dict with "model" and
    "config"), a folder of them (the latest `ckpt_*.pt` is used), or a released folder (config.json +
    model.safetensors). Returns (model in eval mode, Config, checkpoint dict; {} for a released folder, and
    {"tokenizer": state} for an export of ours with its own text tokenizer).
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            model = load_official_vtp(path, device)
            tok = os.path.join(path, TEXT_TOKENIZER_FILE)  # an export of ours with its own BPE
            if os.path.isfile(tok):
                with open(tok) as f:
                    return model, model.cfg, {"tokenizer": json.load(f)}
            return model, model.cfg, {}
    path = resolve_checkpoint(path, f"no tokenizer checkpoint (ckpt_*.pt, or a folder with model.safetensors) at "
                                    f"{path!r}: train one with pretrain.py")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path!r} is not a VTP checkpoint (expected a dict with 'model' and 'config')")
    cfg = Config.from_dict(ckpt["config"])
    model = VTP(cfg)
    model.load_state_dict(ckpt["model"])
    model.cfg = cfg
    return model.to(device).eval(), cfg, ckpt
