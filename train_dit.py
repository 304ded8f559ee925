"""
Stage 3: a class-conditional LightningDiT trained with flow matching on frozen VTP latents (README Method §1, §7).

    python train_dit.py --tokenizer=runs/pretrain          # tiny DiT on the built-in data, CPU, ~14 minutes
    torchrun --nproc_per_node=8 train_dit.py --tokenizer=<ckpt or released folder> --dit.model=XL \\
        --data.dataset=imagenet --data.path=/data/imagenet/train --dit.num_cache_images=0 \\
        --dit.batch_size=128 --dit.max_steps=100000 --dit.ckpt_every=5000 --dit.sample_every=5000
    python train_dit.py sample --dit.out_dir=runs/dit --sample.num_samples=1000  # PNGs + samples.npz (arr_0) for FID
    torchrun --nproc_per_node=8 train_dit.py sample --sample.ckpt=runs/dit/ckpt_0100000.pt --sample.num_samples=50000

Re-running a training command resumes from the latest `ckpt_*.pt` in `--dit.out_dir`. The `sample` sub-command
reads the `--sample.*` section (`num_steps`, `sampler`, `cfg_scale`, `cfg_interval`, `num_samples`, `batch_size`) and
`--run.seed` (the noise), and writes `{sample.out or dit.out_dir/samples}/{index:06d}.png` plus one `samples.npz`
(uint8 NHWC).

The file reads top to bottom:
  1. the DiT (LightningDiT flavour): patch embedding, timestep and class embedders, adaLN-modulated blocks with
     RMSNorm, SwiGLU and 2D RoPE, a zero-initialized final layer; size presets in `model.DiT_models`;
  2. `FlowMatching`: the training objective and the Euler / Heun ODE sampler with classifier-free guidance;
  3. the latent cache: the data set and its horizontal flips encoded once by the frozen tokenizer, plus the
     per-channel statistics used to normalize the latents;
  4. `main()`: config -> compute setup -> tokenizer + latent cache -> model -> optimizer -> loop -> final save;
  5. sampling: `sample_images()` (also used by evaluate.py) and the `sample` sub-command.

Paper settings (Method §7): XL (or S/B) with patch 1, AdamW 2e-4, betas (0.9, 0.95), global batch 1024, 100k
steps, EMA 0.9999 (the preset default), logit-normal t with (-0.5, 1.25) for S/B and `--dit.t_mu=-0.75
--dit.t_sigma=1.0` for L, Euler 250 steps with s = 0.075. The latent cache is float32 and memory-mapped: ImageNet
at f16d64 (64 x 16 x 16, two flips) takes about 170 GB of disk.

Randomness: the draws of step k on rank r (flips, timesteps, noise, label dropout) come from generators seeded with
(seed, r, k), and the data order is one seeded permutation per epoch. The step number is therefore the whole RNG
state and the data position, and a run resumed from a checkpoint repeats the losses of an uninterrupted one.
"""

import copy
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import build_dataset, build_eval_loader, denormalize
from model import (Attention, Config, ConfigError, DiT_models, RMSNorm, RopeEmbedding, SwiGLU, Tracker, adamw,
                   amp_setup, barrier, cleanup_distributed, config_summary, ema_update, load_vtp, parse_config, print0,
                   resolve_checkpoint, run_cli, save_checkpoint, setup_distributed, step_generator, swiglu_hidden,
                   trim_metrics)

ALIASES = {"tokenizer": "dit.tokenizer"}

# -----------------------------------------------------------------------------
# 1. The DiT (LightningDiT: DiT + RMSNorm, SwiGLU, 2D RoPE)


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): non-overlapping p x p patches, row-major over the patch grid."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x, p, h, w):
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p): the inverse of `patchify` for an h x w patch grid."""
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)


def sincos_pos_embed(dim, h, w):
    """
    Fixed 2D sin-cos position embedding (DiT, MAE) -> (h*w, dim), row-major over the grid: the first dim/2
    channels encode the row index, the last dim/2 the column, each as [sin(pos*f_k), cos(pos*f_k)] with
    f_k = 10000^(-k/(dim/4)), k = 0 .. dim/4 - 1.
    """
    assert dim % 4 == 0, "the 2D sin-cos embedding needs dim divisible by 4"
    freqs = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)

    def embed_1d(pos):  # (n,) -> (n, dim/2)
        args = pos.double()[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([embed_1d(rows.flatten()), embed_1d(cols.flatten())], dim=1).float()


def modulate(x, shift, scale):
    """adaLN modulation: x (B, N, D) * (1 + scale) + shift, with shift and scale (B, 1, D)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """
    t (B,) in [0, 1] -> (B, D): sinusoidal frequency embedding of t_scale*t (cos half, then sin half), then
    Linear-SiLU-Linear. t is scaled by 1000 so the frequencies span the range DiT's 1000 discrete steps had.
    """

    def __init__(self, dim, freq_dim=256, t_scale=1000.0, max_period=10000.0):
        super().__init__()
        self.freq_dim, self.t_scale, self.max_period = freq_dim, t_scale, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequency_embedding(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)  # (half,)
        args = self.t_scale * t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)

    def forward(self, t):
        return self.mlp(self.frequency_embedding(t))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Row `num_classes` is the null class used for classifier-free guidance; label
    dropout (replacing labels by the null class) happens in `FlowMatching.training_losses` with its generator."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    """
    x + gate_msa * Attn(modulate(norm1(x))), then x + gate_mlp * SwiGLU(modulate(norm2(x))); shift, scale and
    gate of both branches come from the conditioning c (B, D) through a zero-initialized adaLN Linear, so every
    block starts as the identity. x: (B, N, D).
    """

    def __init__(self, dim, num_heads, mlp_hidden):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        mod = self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """RMSNorm, adaLN (shift, scale), Linear(D -> p*p*C), adaLN and Linear zero-initialized.
    (B, N, D) -> (B, N, p*p*C)."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # each (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """
    Class-conditional LightningDiT over a latent map (Method §7). forward(x, t, y) -> velocity, with
    x (B, C, H, W) latents, t (B,) in [0, 1] (1 = data), y (B,) labels in [0, num_classes] (num_classes = null).

    Patch embedding = patchify + Linear (the same map as a stride-p conv), plus the fixed 2D sin-cos position
    embedding, as in LightningDiT. Every attention layer adds 2D RoPE (model.py's axial RoPE in fp32). RoPE alone
    is not enough: it only encodes offsets between tokens, so a RoPE-only DiT hardly knows where in the image a
    token is and scatters an object over the grid (on the built-in data it could not even memorize 8 images).
    Every adaLN Linear and the output Linear start at zero: an untrained DiT outputs 0.
    """

    def __init__(self, input_size, in_channels, num_classes, patch_size=1, depth=6, width=192, num_heads=3,
                 rope_base=100.0, seed=0):
        super().__init__()
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.patch_size = patch_size
        patch_dim = patch_size * patch_size * in_channels
        self.x_embedder = nn.Linear(patch_dim, width)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(width, grid, grid)[None], persistent=False)  # (1, N, D)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        self.rope = RopeEmbedding(width // num_heads, base=rope_base, dtype="fp32")
        hidden = swiglu_hidden(width)
        self.blocks = nn.ModuleList([DiTBlock(width, num_heads, hidden) for _ in range(depth)])
        self.final_layer = FinalLayer(width, patch_dim)
        self.initialize_weights(torch.Generator().manual_seed(seed))

    def initialize_weights(self, g):
        """DiT's init, drawn from generator g: Xavier-uniform Linears with zero bias, N(0, 0.02) for the embedders,
        zeros for adaLN and the output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=g)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02, generator=g)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02, generator=g)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02, generator=g)
        zero = [blk.adaLN_modulation[-1] for blk in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y):
        p = self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.x_embedder(patchify(x, p)) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        rope = self.rope(h, w)  # (sin, cos), each (N, head_dim)
        for blk in self.blocks:
            x = blk(x, c, rope)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        return unpatchify(x, p, h, w)  # (B, C, H, W)


def build_dit(name, input_size, in_channels, num_classes, patch_size=1, seed=0):
    """A DiT of preset `name` (a key of model.DiT_models, beside the VTP presets so the config can check it) for
    latents (in_channels, input_size, input_size), its initial weights drawn from a generator seeded with `seed`."""
    sizes = {k: v for k, v in DiT_models[name].items() if k not in ("lr", "ema_decay")}
    return DiT(input_size, in_channels, num_classes, patch_size, **sizes, seed=seed)


# -----------------------------------------------------------------------------
# 2. Flow matching: objective and ODE sampler (Method §7)


def shift_time(t, s):
    """Shifted time t' = s*t / (1 + (s-1)*t): keeps 0 and 1 fixed; s < 1 puts more of the grid near t=0 (noise)."""
    return s * t / (1 + (s - 1) * t)


def time_grid(num_steps, s):
    """The num_steps + 1 sampling times from 0 (noise) to 1 (data) on the shifted grid, as Python floats."""
    ts = shift_time(torch.linspace(0, 1, num_steps + 1, dtype=torch.float64), s).tolist()
    ts[0], ts[-1] = 0.0, 1.0  # exact endpoints (rounding would leave 1 + 1e-15)
    return ts


class FlowMatching:
    """
    Linear-path flow matching with t = 1 at the data: x_t = t*x + (1-t)*eps, velocity target v = x - eps.
    t ~ logit-normal(t_mu, t_sigma). Loss = MSE(v_hat, v) + cos_weight * mean(1 - cos(v_hat, v)), the cosine taken
    over channels at every position. Labels are replaced by the null class with probability class_dropout.
    """

    def __init__(self, num_classes, t_mu=-0.5, t_sigma=1.25, cos_weight=1.0, class_dropout=0.1):
        self.null_class = num_classes
        self.t_mu, self.t_sigma, self.cos_weight, self.class_dropout = t_mu, t_sigma, cos_weight, class_dropout

    def training_losses(self, model, x, y, generator=None):
        """x (B, C, H, W) normalized latents, y (B,) labels -> {"loss", "mse", "cos"} scalar tensors (fp32)."""
        B, dd = x.shape[0], dict(device=x.device, generator=generator)
        t = torch.sigmoid(self.t_mu + self.t_sigma * torch.randn(B, **dd))  # (B,) logit-normal
        noise = torch.randn(x.shape, **dd, dtype=x.dtype)
        drop = torch.rand(B, **dd) < self.class_dropout
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        tt = t.view(B, 1, 1, 1)
        x_t = tt * x + (1 - tt) * noise
        target = x - noise
        pred = model(x_t, t, y).float()
        mse = (pred - target).pow(2).mean()
        # Gotcha: the zero-initialized output makes the cosine's gradient ~1/eps at step 0 (and large for a few
        # steps after); gradient clipping (dit.grad_clip) keeps those first updates and Adam's moments bounded.
        cos = (1 - torch.cosine_similarity(pred, target, dim=1)).mean()  # over channels, per position
        return {"loss": mse + self.cos_weight * cos, "mse": mse, "cos": cos}

    def velocity(self, model, x, t, y, cfg_scale=1.0, cfg_interval=(0.0, 1.0)):
        """Model velocity at the scalar time t; with guidance v_u + scale*(v_c - v_u) when t is in cfg_interval."""
        tb = torch.full((x.shape[0],), t, device=x.device)
        if cfg_scale == 1.0 or not cfg_interval[0] <= t <= cfg_interval[1]:
            return model(x, tb, y).float()
        null = torch.full_like(y, self.null_class)
        v = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null])).float()  # (2B, C, H, W)
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def sample(self, model, noise, y, num_steps=250, sampler="euler", time_shift=0.075, cfg_scale=1.0,
               cfg_interval=(0.0, 1.0)):
        """Integrate dx/dt = v(x, t) from t=0 (noise (B, C, H, W)) to t=1 on the shifted grid -> latents (fp32)."""
        ts = time_grid(num_steps, time_shift)
        x = noise.float()
        for t0, t1 in zip(ts[:-1], ts[1:]):
            v0 = self.velocity(model, x, t0, y, cfg_scale, cfg_interval)
            if sampler == "heun":  # trapezoid: average the slopes at both ends of the Euler step
                v1 = self.velocity(model, x + (t1 - t0) * v0, t1, y, cfg_scale, cfg_interval)
                v0 = 0.5 * (v0 + v1)
            x = x + (t1 - t0) * v0
        return x


# -----------------------------------------------------------------------------
# 3. Latent cache (Method §7): encode once with the frozen tokenizer, store each image and its flip


def latent_stats(latents):
    """Per-channel mean and std (population) of latents (N, C, h, w), computed in float64 -> two (C,) fp32."""
    z = latents.double()
    return z.mean(dim=(0, 2, 3)).float(), z.std(dim=(0, 2, 3), unbiased=False).float()


def normalize_latents(z, mean, std):
    """z' = (z - mean) / std per channel; z (B, C, h, w), mean and std (C,)."""
    return (z - mean.view(1, -1, 1, 1).to(z)) / std.view(1, -1, 1, 1).to(z)


def denormalize_latents(z, mean, std):
    """The inverse of normalize_latents: z * std + mean."""
    return z * std.view(1, -1, 1, 1).to(z) + mean.view(1, -1, 1, 1).to(z)


def tokenizer_fingerprint(vtp):
    """sha256 (16 hex digits) of the encoder and bottleneck weights (`trunk.*`), the tensors that decide the
    latents; a stage-2 checkpoint (new decoder, same frozen encoder) keeps the fingerprint of its stage 1."""
    h = hashlib.sha256()
    for name, t in sorted(vtp.state_dict().items()):
        if name.startswith("trunk."):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_tokenizer(path, device):
    """The frozen VTP tokenizer from `--tokenizer`, with a clear error when it is missing -> (vtp, Config)."""
    if not path:
        raise ConfigError("dit.tokenizer is empty: pass --tokenizer=<stage-1/2 checkpoint file or folder from "
                          "pretrain.py, or a released VTP folder with config.json + model.safetensors>")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--tokenizer={path}: no such file or folder; train a tokenizer first "
                                f"(python pretrain.py writes runs/pretrain/ckpt_*.pt) or pass a released VTP folder")
    vtp, tok_cfg, _ = load_vtp(path, device)
    return vtp.requires_grad_(False), tok_cfg


def tokenizer_file(path):
    """The checkpoint file `--tokenizer` resolves to (a folder's latest ckpt_*.pt; a released folder as is)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model.safetensors")):
        return os.path.abspath(resolve_checkpoint(path) or path)
    return os.path.abspath(path)


def cache_signature(cfg, tok_cfg, fingerprint):
    """What a latent cache depends on; a cache whose meta.json differs in any of these is rebuilt."""
    e, d = tok_cfg.encoder, cfg.data
    return {"fingerprint": fingerprint, "image_size": e.image_size, "tokenizer_patch": e.patch_size,
            "latent_dim": e.latent_dim, "dataset": d.dataset, "data_path": os.path.abspath(d.path) if d.path else "",
            "num_cache_images": cfg.dit.num_cache_images}


def build_latent_cache(cfg, vtp, tok_cfg, signature, cache_dir, rank, world_size, device, amp):
    """
    Encode this rank's share of the training images and their horizontal flips into
    `cache_dir/shard_{rank}_{k}.pt` = {"latents": (n, 2, C, h, w) [orig, flip], "labels": (n,), "index": (n,)};
    then rank 0 writes `stats.pt` (per-channel mean/std of the first `stats_images` unflipped latents) and finally
    `meta.json`, whose presence marks a complete cache.
    """
    d, S, p = cfg.dit, tok_cfg.encoder.image_size, tok_cfg.encoder.patch_size
    if rank == 0:  # drop the files of an old cache first, so no stale shard survives
        os.makedirs(cache_dir, exist_ok=True)
        for name in os.listdir(cache_dir):
            if name.startswith("shard_") or name in ("stats.pt", "meta.json"):
                os.remove(os.path.join(cache_dir, name))
    barrier()
    loader = build_eval_loader(cfg, "all", S, d.batch_size, rank=rank, world_size=world_size,  # no validation here
                               max_images=d.num_cache_images or None)
    want = (tok_cfg.encoder.latent_dim, S // p, S // p)
    buf, k = [], 0
    for batch in tqdm(loader, desc="encoding latents", disable=rank != 0):
        images = batch["images"].to(device)
        if tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"data gives images {tuple(images.shape[1:])} but the tokenizer expects (3, {S}, {S})")
        with torch.no_grad(), amp():
            z = torch.stack([vtp.encode(images), vtp.encode(images.flip(-1))], dim=1).float()  # (b, 2, C, h, w)
        if tuple(z.shape[2:]) != want:
            raise ValueError(f"tokenizer gave latents {tuple(z.shape[2:])}, its config says {want}")
        buf.append((z.cpu(), batch["labels"].long().cpu(), torch.as_tensor(batch["index"]).long().cpu()))
        if sum(len(b[1]) for b in buf) >= d.shard_size:
            _write_shard(cache_dir, rank, k, buf)
            buf, k = [], k + 1
    if buf:
        _write_shard(cache_dir, rank, k, buf)
    barrier()
    if rank == 0:
        cache = LatentCache(cache_dir, require_meta=False)
        first = torch.argsort(cache.index)[: d.stats_images]  # the same images whatever the world size
        mean, std = latent_stats(cache.gather(first, torch.zeros(len(first), dtype=torch.bool)))
        save_checkpoint(os.path.join(cache_dir, "stats.pt"), {"mean": mean, "std": std, "num_images": len(first)})
        meta = dict(signature, tokenizer=os.path.abspath(d.tokenizer), num_images=len(cache), world_size=world_size)
        tmp = os.path.join(cache_dir, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(cache_dir, "meta.json"))
    barrier()


def _write_shard(cache_dir, rank, k, buf):
    latents, labels, index = (torch.cat(x) for x in zip(*buf))
    save_checkpoint(os.path.join(cache_dir, f"shard_{rank}_{k}.pt"),
                    {"latents": latents, "labels": labels, "index": index})


def cache_matches(cache_dir, signature):
    """True when cache_dir holds a complete cache made with this signature."""
    try:
        with open(os.path.join(cache_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in signature.items())


class LatentCache:
    """
    All cached latents, read from the shard files memory-mapped (a big cache need not fit in RAM).
    len(cache) = N; cache.labels (N,); cache.index (N,) data-set indices; cache.mean / cache.std (C,) statistics.
    gather(pos (B,), flip (B,) bool) -> (B, C, h, w) latents, the flipped copy where flip is True.
    """

    def __init__(self, cache_dir, require_meta=True):
        if require_meta and not os.path.isfile(os.path.join(cache_dir, "meta.json")):
            raise FileNotFoundError(f"{cache_dir} holds no complete latent cache (no meta.json)")
        names = [n for n in os.listdir(cache_dir) if n.startswith("shard_") and n.endswith(".pt")]
        names.sort(key=lambda n: tuple(int(v) for v in n[len("shard_"):-len(".pt")].split("_")))  # (rank, k)
        shards = [torch.load(os.path.join(cache_dir, n), mmap=True, weights_only=True) for n in names]
        self.latents = [s["latents"] for s in shards]
        self.labels = torch.cat([s["labels"] for s in shards])
        self.index = torch.cat([s["index"] for s in shards])
        self.offsets = torch.tensor([0] + [len(z) for z in self.latents]).cumsum(0)  # (num_shards + 1,)
        stats = os.path.join(cache_dir, "stats.pt")
        if os.path.isfile(stats):
            s = torch.load(stats, weights_only=True)
            self.mean, self.std = s["mean"], s["std"]

    def __len__(self):
        return int(self.offsets[-1])

    def gather(self, pos, flip):
        shard = torch.searchsorted(self.offsets, pos, right=True) - 1  # (B,)
        out = torch.empty(len(pos), *self.latents[0].shape[2:])
        for s in shard.unique().tolist():
            sel = (shard == s).nonzero().squeeze(1)
            local = pos[sel] - self.offsets[s]
            out[sel] = self.latents[s][local, flip[sel].long()].float()
        return out  # (B, C, h, w)


class EpochSampler:
    """
    Cache positions of (step, rank) as a pure function of the step: epochs of seeded permutations of range(n),
    concatenated; the global batch of step k is items [k*B*W, (k+1)*B*W) of that sequence, rank r takes its slice.
    """

    def __init__(self, n, batch_size, rank, world_size, seed):
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self._epoch, self._perm = -1, None

    def perm(self, epoch):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def position(self, step):
        """The data position after `step` steps: {"epoch", "offset"} into that epoch's permutation."""
        epoch, offset = divmod(step * self.batch_size * self.world_size, self.n)
        return {"epoch": epoch, "offset": offset}

    def indices(self, step):
        start = (step * self.world_size + self.rank) * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, off = divmod(start + len(out), self.n)
            out += self.perm(epoch)[off: off + self.batch_size - len(out)].tolist()
        return torch.tensor(out)  # (B,)


def dataset_num_classes(cfg):
    """Number of classes of the training set (its class_names); the DiT is class-conditional, so it needs labels."""
    names = getattr(build_dataset(cfg, "all"), "class_names", None)
    if not names:
        raise ConfigError(f"invalid config value data.dataset={cfg.data.dataset!r}: the class-conditional DiT needs "
                          "labelled data (builtin, or an ImageNet-style class folder with --data.dataset=imagenet)")
    return len(names)


def prepare_latent_cache(cfg, vtp, tok_cfg, fingerprint, rank, world_size, device, amp):
    """Reuse `{out_dir}/latents` when it was made by this tokenizer on this data, else (re)build it -> LatentCache."""
    cache_dir = os.path.join(cfg.dit.out_dir, "latents")
    signature = cache_signature(cfg, tok_cfg, fingerprint)
    if cache_matches(cache_dir, signature):
        print0(f"latent cache: reusing {cache_dir}")
    else:
        if os.path.isfile(os.path.join(cache_dir, "meta.json")):
            print0(f"latent cache: {cache_dir} was made by another tokenizer or data set; rebuilding it")
        build_latent_cache(cfg, vtp, tok_cfg, signature, cache_dir, rank, world_size, device, amp)
    cache = LatentCache(cache_dir)
    print0(f"latent cache: {len(cache)} images x 2 flips, latents {tuple(cache.latents[0].shape[2:])}")
    return cache


# -----------------------------------------------------------------------------
# 4. Training


def train_step(model, dit, ema, fm, opt, scaler, x, y, gen, amp, grad_clip, ema_decay):
    """One optimizer step: forward under autocast, backward (scaled for fp16), clip, AdamW, EMA update.
    Returns the loss dict and the gradient norm (device tensors: nothing here waits for the accelerator)."""
    with amp():
        losses = fm.training_losses(model, x, y, generator=gen)
    if scaler is not None:
        scaler.scale(losses["loss"]).backward()
        scaler.unscale_(opt)  # clip the true gradients
    else:
        losses["loss"].backward()
    grad_norm = nn.utils.clip_grad_norm_(dit.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    ema_update(ema, dit, ema_decay)  # fp32, from the raw module
    return losses, grad_norm


@torch.no_grad()
def decode_latents(vtp, z, mean, std, amp=None):
    """Normalized latents (B, C, h, w) -> uint8 images (B, H, W, 3): un-normalize, decode, ImageNet-denormalize."""
    with (amp or nullcontext)():
        images = vtp.decode(denormalize_latents(z.float(), mean, std))
    images = denormalize(images.float()).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def save_sample_grid(path, ema, fm, vtp, mean, std, cfg, device, amp):
    """A PNG grid of EMA samples: one row per class (grid_classes spread over all classes), grid_per_class columns.
    The noise is seeded by run.seed, so grids of successive steps show the same starting points; guidance is
    dit.grid_cfg_scale (4 by default, as in DiT's sample figures; the `sample` command and FID use sample.cfg_scale, 1
    by default as in the paper's headline numbers). Images smaller than 128 px are enlarged (nearest neighbour) so
    that 32 px CPU samples can be seen."""
    d, s = cfg.dit, cfg.sample
    n_cls = min(d.grid_classes, ema.num_classes)
    classes = torch.linspace(0, ema.num_classes - 1, n_cls).round().long()
    y = classes.repeat_interleave(d.grid_per_class).to(device)  # (rows * cols,)
    g = torch.Generator().manual_seed(cfg.run.seed)
    noise = torch.randn(len(y), ema.in_channels, ema.input_size, ema.input_size, generator=g).to(device)
    with amp():
        z = fm.sample(ema, noise, y, s.num_steps, s.sampler, s.time_shift, d.grid_cfg_scale, s.cfg_interval)
    images = decode_latents(vtp, z, mean, std, amp)  # (rows * cols, H, W, 3)
    H, W = images.shape[1:3]
    grid = images.reshape(n_cls, d.grid_per_class, H, W, 3).transpose(0, 2, 1, 3, 4).reshape(n_cls * H, -1, 3)
    zoom = max(1, 128 // H)
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)


def save_dit_checkpoint(d, step, state):
    """Atomic save of ckpt_{step:07d}.pt in out_dir, then keep only the newest `keep_ckpts` (0 = all)."""
    path = os.path.join(d.out_dir, f"ckpt_{step:07d}.pt")
    save_checkpoint(path, state, keep=d.keep_ckpts)
    return path


def find_resume_checkpoint(d, fingerprint):
    """The latest ckpt_*.pt of out_dir and its contents, or (None, None); refuses one trained on other latents."""
    resume = resolve_checkpoint(d.out_dir)
    if resume is None:
        return None, None
    ckpt = torch.load(resume, map_location="cpu", weights_only=True)
    if ckpt["tokenizer"]["fingerprint"] != fingerprint:
        raise ValueError(f"{resume} was trained on the latents of tokenizer {ckpt['tokenizer']['path']} (fingerprint "
                         f"{ckpt['tokenizer']['fingerprint']}), but --tokenizer={d.tokenizer} has fingerprint "
                         f"{fingerprint}; use another --dit.out_dir")
    return resume, ckpt


def restore(ckpt, dit, ema, opt, scaler, world_size):
    """Load model, EMA, optimizer and scaler states from a checkpoint; returns its step. Generator states need no
    restoring: they are functions of (seed, rank, step)."""
    dit.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt["rng"]["world_size"] != world_size:
        print0(f"note: resuming with {world_size} processes, saved with {ckpt['rng']['world_size']}: the data "
               "order and noise differ from an uninterrupted run from here on")
    return ckpt["step"]


def main(argv=None):
    """Train a class-conditional DiT on the tokenizer's latents; see the module docstring for the CLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    # 1. config
    cfg = parse_config(argv, aliases=ALIASES)
    d = cfg.dit
    ema_decay = d.ema_decay or DiT_models[d.model]["ema_decay"]
    lr = d.lr or DiT_models[d.model]["lr"]
    # 2. compute setup
    rank, world_size, local_rank, device = setup_distributed(cfg.run.device)
    amp, scaler = amp_setup(cfg.run.amp, device)  # amp() opens an autocast region
    print0(config_summary(cfg, "the checkpoints"))
    os.makedirs(d.out_dir, exist_ok=True)
    # 3. tokenizer, resume checkpoint, latent cache
    vtp, tok_cfg = load_tokenizer(d.tokenizer, device)
    fingerprint = tokenizer_fingerprint(vtp)
    grid = tok_cfg.encoder.image_size // tok_cfg.encoder.patch_size
    if grid % d.patch_size:
        raise ConfigError(f"invalid config value dit.patch_size={d.patch_size}: must divide the latent grid {grid}")
    resume, ckpt = find_resume_checkpoint(d, fingerprint)
    num_classes = dataset_num_classes(cfg)
    cache = prepare_latent_cache(cfg, vtp, tok_cfg, fingerprint, rank, world_size, device, amp)
    sampler = EpochSampler(len(cache), d.batch_size, rank, world_size, cfg.run.seed)
    # 4. model, EMA, objective
    dit_args = dict(name=d.model, input_size=grid, in_channels=tok_cfg.encoder.latent_dim,
                    num_classes=num_classes, patch_size=d.patch_size)
    dit = build_dit(**dit_args, seed=cfg.run.seed).to(device)
    ema = copy.deepcopy(dit).requires_grad_(False).eval()
    fm = FlowMatching(num_classes, d.t_mu, d.t_sigma, d.cos_weight, d.class_dropout)
    print0(f"DiT-{d.model}: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters, latents "
           f"({dit.in_channels}, {grid}, {grid}), {num_classes} classes, lr {lr:g}, EMA {ema_decay}")
    # 5. optimizer (constant lr, no schedule) and resume
    opt = adamw(dit.parameters(), device, lr=lr, betas=d.betas, weight_decay=d.weight_decay)
    step = restore(ckpt, dit, ema, opt, scaler, world_size) if ckpt is not None else 0
    if rank == 0:
        trim_metrics(d.out_dir, step)
    if ckpt is not None:
        print0(f"resumed from {resume} at step {step}")
    model = DDP(dit, device_ids=[local_rank] if device.type == "cuda" else None) if world_size > 1 else dit
    model = torch.compile(model) if cfg.run.compile else model
    mean, std = cache.mean.to(device), cache.std.to(device)

    def state(step):
        return {"model": dit.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
                "config": cfg.to_dict(), "dit_args": dit_args, "latent_stats": {"mean": cache.mean, "std": cache.std},
                "tokenizer": {"path": d.tokenizer, "abs_path": os.path.abspath(d.tokenizer),
                              "file": tokenizer_file(d.tokenizer), "fingerprint": fingerprint},
                "data_position": sampler.position(step),
                "rng": {"seed": cfg.run.seed, "world_size": world_size,
                        "rule": "generators seeded by (seed, rank, step)"}}

    # 6. training loop
    pbar = tqdm(total=d.max_steps, initial=step, desc="DiT", disable=rank != 0, dynamic_ncols=True)
    tracker, last_ckpt = Tracker(world_size, step), resume
    while step < d.max_steps:
        pos = sampler.indices(step)
        flip = torch.rand(len(pos), generator=step_generator(cfg.run.seed, rank, step, "cpu", stream=1)) < 0.5
        x = normalize_latents(cache.gather(pos, flip).to(device), mean, std)  # (B, C, h, w)
        y = cache.labels[pos].to(device)
        gen = step_generator(cfg.run.seed, rank, step, device)
        losses, grad_norm = train_step(model, dit, ema, fm, opt, scaler, x, y, gen, amp, d.grad_clip, ema_decay)
        step += 1
        pbar.update(1)
        tracker.add({**losses, "grad_norm": grad_norm}, step)
        last = step == d.max_steps
        if step % d.log_every == 0 or last or step % d.ckpt_every == 0:
            tracker.log(d.out_dir, pbar, step, d.max_steps, d.batch_size * world_size, lr)
        t1 = time.time()
        if (step % d.sample_every == 0 or last) and rank == 0:
            path = os.path.join(d.out_dir, f"samples_{step:07d}.png")
            save_sample_grid(path, ema, fm, vtp, mean, std, cfg, device, amp)
            pbar.write(f"wrote {path}")
        if (step % d.ckpt_every == 0 or last) and rank == 0:
            last_ckpt = save_dit_checkpoint(d, step, state(step))
        tracker.exclude(time.time() - t1)  # sampling and saving stay out of ms/step
    pbar.close()
    # 7. done: tear DDP down cleanly (barrier, drop the wrapper, then destroy the process group)
    barrier()
    del model
    cleanup_distributed()
    return last_ckpt


# -----------------------------------------------------------------------------
# 5. Sampling (for evaluate.py's gFID and the `sample` sub-command)


def load_dit(path, device="cpu"):
    """A DiT checkpoint file, or a folder (its latest ckpt_*.pt) -> (EMA DiT in eval mode, checkpoint dict)."""
    path = resolve_checkpoint(path, f"no DiT checkpoint (ckpt_*.pt) at {path!r}: train a DiT first "
                                    "(python train_dit.py --tokenizer=...)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    dit = build_dit(**ckpt["dit_args"])
    dit.load_state_dict(ckpt["ema"])
    return dit.to(device).eval().requires_grad_(False), ckpt


def tokenizer_path_of(ckpt, device="cpu"):
    """The tokenizer a DiT checkpoint was trained on: the first of its path as given, its absolute path and the
    exact checkpoint file used at training time whose encoder still has the recorded fingerprint (a folder's latest
    checkpoint may since be a later stage-1 step; a stage-2 one keeps the encoder and so the fingerprint).
    Returns (path, loaded tokenizer)."""
    tok = ckpt["tokenizer"]
    for path in dict.fromkeys((tok["path"], tok["abs_path"], tok.get("file", ""))):
        if path and os.path.exists(path):
            vtp, _ = load_tokenizer(path, device)
            if tokenizer_fingerprint(vtp) == tok["fingerprint"]:
                return path, vtp
    raise FileNotFoundError(f"no tokenizer with fingerprint {tok['fingerprint']} at {tok['path']!r} or "
                            f"{tok.get('file', '')!r}: the DiT's tokenizer was moved or changed")


def image_noise(seed, index, shape):
    """The starting noise of global image `index`: its own generator, so image i is the same for any batch size
    or number of processes."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(index)))


@torch.no_grad()
def sample_images(ckpt_path, num_images, seed=0, batch_size=64, device="cpu", cfg_scale=None, num_steps=None,
                  rank=0, world_size=1, *, sampler=None, cfg_interval=None):
    """
    Generate this rank's share of `num_images` samples from a DiT checkpoint (file or folder) with its EMA weights:
    global indices rank, rank + world_size, ...; image i has label i % num_classes (classes cycle, so 50k samples
    of ImageNet give 50 per class) and noise seeded by (seed, i). None for cfg_scale / num_steps / sampler /
    cfg_interval means the checkpoint config's value. Returns (uint8 (n, H, W, 3), int64 global indices (n,)).
    """
    device = torch.device(device)
    ema, ckpt = load_dit(ckpt_path, device)
    ckpt_cfg = Config.from_dict(ckpt["config"])
    s = ckpt_cfg.sample
    vtp = tokenizer_path_of(ckpt, device)[1]
    amp, _ = amp_setup(ckpt_cfg.run.amp if device.type == "cuda" else "fp32", device)
    fm = FlowMatching(ema.num_classes)
    mean, std = (ckpt["latent_stats"][k].to(device) for k in ("mean", "std"))
    steps = num_steps or s.num_steps
    scale = s.cfg_scale if cfg_scale is None else cfg_scale
    interval = tuple(cfg_interval or s.cfg_interval)
    indices = np.arange(rank, num_images, world_size, dtype=np.int64)
    shape = (ema.in_channels, ema.input_size, ema.input_size)
    size = ema.input_size * vtp.patch_size
    out = np.zeros((len(indices), size, size, 3), dtype=np.uint8)
    for start in tqdm(range(0, len(indices), batch_size), desc="sampling", disable=rank != 0):
        idx = indices[start: start + batch_size]
        noise = torch.stack([image_noise(seed, i, shape) for i in idx]).to(device)  # (b, C, h, w)
        y = torch.as_tensor(idx % ema.num_classes).to(device)
        with amp():
            z = fm.sample(ema, noise, y, steps, sampler or s.sampler, s.time_shift, scale, interval)
        out[start: start + len(idx)] = decode_latents(vtp, z, mean, std, amp)
    return out, indices


def sample_main(argv=None):
    """`python train_dit.py sample ...`: PNGs and samples.npz from a DiT checkpoint, split over torchrun ranks."""
    cfg = parse_config(argv or [], aliases=ALIASES)
    d = cfg.dit
    rank, world_size, _, device = setup_distributed(cfg.run.device)
    s = cfg.sample
    out_dir = s.out or os.path.join(d.out_dir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    images, indices = sample_images(s.ckpt or d.out_dir, s.num_samples, seed=cfg.run.seed, batch_size=s.batch_size,
                                    device=device, cfg_scale=s.cfg_scale, num_steps=s.num_steps, rank=rank,
                                    world_size=world_size, sampler=s.sampler, cfg_interval=s.cfg_interval)
    for img, i in zip(images, indices):
        Image.fromarray(img).save(os.path.join(out_dir, f"{i:06d}.png"))
    np.savez(os.path.join(out_dir, f"part_{rank}.npz"), arr_0=images, index=indices)
    barrier()
    if rank == 0:  # merge the ranks' parts in global index order
        parts = [np.load(os.path.join(out_dir, f"part_{r}.npz")) for r in range(world_size)]
        allimg = np.concatenate([p["arr_0"] for p in parts])
        order = np.argsort(np.concatenate([p["index"] for p in parts]))
        np.savez(os.path.join(out_dir, "samples.npz"), arr_0=allimg[order])
        for r in range(world_size):
            os.remove(os.path.join(out_dir, f"part_{r}.npz"))
        print0(f"wrote {len(order)} samples to {out_dir} (PNGs and samples.npz)")
    cleanup_distributed()
    return os.path.join(out_dir, "samples.npz")


if __name__ == "__main__":
    run_cli(main)
