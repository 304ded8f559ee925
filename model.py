"""
VTP tokenizer: the shared config tree and every network of the tokenizer.

"Towards Scalable Pre-training of Visual Tokenizers for Generation" (VTP, arXiv 2512.13687).
A ViT encoder trained with CLIP + self-supervised (DINOv2-style) + reconstruction losses, a 64-channel
bottleneck at stride 16, and a ViT pixel decoder. This file holds:

  1. the one dataclass config that every stage shares, its presets and the typed `--key=value` parser;
  2. small shared utilities (distributed setup, atomic checkpoints);
  3. the networks: encoder (`VisionTransformer`), `PixelDecoder`, `TextTransformer`, `DINOHead`, and the
     `VTP` module whose tensor names match the released checkpoints;
  4. `load_official_vtp` (with a from-scratch safetensors reader) and `load_vtp` for our own checkpoints.
"""

import dataclasses
import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config: one dataclass tree shared by all stages. Defaults are the CPU `tiny` preset.


@dataclass
class EncoderConfig:
    image_size: int = 32  # training resolution; any multiple of patch_size works at inference
    patch_size: int = 4  # stride of the tokenizer (16 for the released models)
    width: int = 192  # token width D
    depth: int = 6  # number of transformer blocks
    num_heads: int = 3  # attention heads (head_dim = width / num_heads, must be a multiple of 4 for RoPE)
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
    width: int = 192  # token width of the pixel decoder
    depth: int = 4  # number of blocks
    num_heads: int = 3  # attention heads
    mlp_hidden: int = 0  # SwiGLU hidden size; 0 = int(4*D*2/3) rounded up to a multiple of 8


@dataclass
class TextConfig:
    vocab_size: int = 1024  # BPE vocabulary (49408 for the CLIP vocabulary); end-of-text must be the largest id
    context_length: int = 32  # tokens per caption, start and end tokens included (77 for CLIP)
    width: int = 128  # transformer width
    depth: int = 4  # transformer layers
    num_heads: int = 2  # attention heads
    mlp_ratio: float = 4.0  # GELU MLP hidden = mlp_ratio * width
    embed_dim: int = 128  # shared image-text embedding size (text_projection and visual_proj outputs)
    tokenizer: str = "bpe"  # "bpe" = train a byte-level BPE on the captions; or a path to bpe_simple_vocab_16e6.txt.gz


@dataclass
class HeadConfig:
    hidden_dim: int = 512  # DINO head MLP hidden size (2048 for S/B/L)
    bottleneck_dim: int = 256  # L2-normalized bottleneck before the prototypes
    num_prototypes: int = 1024  # K, the number of prototypes (65536 for S/B/L)
    nlayers: int = 3  # MLP layers before the bottleneck projection counts as the last one


@dataclass
class LossConfig:
    lambda_rec: float = 0.1  # weight of L_rec (paper: 0.1)
    lambda_ssl: float = 1.0  # weight of L_ssl (paper: 0 or 1)
    lambda_clip: float = 1.0  # weight of L_clip (paper: 0 or 1)
    l1_weight: float = 1.0  # weight of L1 inside L_rec
    lpips_weight: float = 1.0  # weight of LPIPS inside L_rec (disabled when no weights are given)
    lpips_vgg_path: str = ""  # path to ImageNet VGG16 weights (vgg16-397923af.pth layout)
    lpips_lin_path: str = ""  # path to LPIPS v0.1 linear heads (lin0.model.1.weight ... lin4...)
    koleo_weight: float = 0.1  # weight of the KoLeo regularizer inside L_ssl
    student_temp: float = 0.1  # student softmax temperature
    teacher_temp: float = 0.07  # teacher temperature after warm-up
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0
    teacher_temp_warmup_frac: float = 0.3  # fraction of steps to warm the teacher temperature up
    teacher_norm: str = "sinkhorn"  # teacher probabilities: "sinkhorn" (Sinkhorn-Knopp) or "centering"
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
    batch_size: int = 64  # B: image-text pairs per process per micro-step (all feed CLIP)
    ssl_batch_size: int = 16  # B_ssl: random subset of the B samples that feeds SSL (paper 16k/4k)
    rec_batch_size: int = 8  # B_rec: random subset that feeds reconstruction (paper 16k/2k)
    num_local_crops: int = 8  # DINOv2 local crops per image (2 global crops always)
    global_crop_scale: tuple = (0.32, 1.0)  # RandomResizedCrop scale range of global crops
    local_crop_scale: tuple = (0.05, 0.32)  # RandomResizedCrop scale range of local crops
    local_crop_size: int = 0  # local crop side; 0 = patch * round(grid * 7/16) (112 for 256 px)
    mask_prob: float = 0.5  # fraction of global crops that get an iBOT mask
    mask_ratio: tuple = (0.1, 0.5)  # iBOT mask ratios, spread linearly across the batch
    mask_min_patches: int = 4  # smallest block of a BEiT-style mask
    mask_aspect: tuple = (0.3, 3.33)  # aspect-ratio range of mask blocks
    num_workers: int = 0  # data-loader worker processes per rank
    builtin_train_size: int = 1_000_000  # number of distinct built-in training scenes
    builtin_val_size: int = 1000  # number of built-in validation scenes
    seed: int = 0  # data seed


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak lr at a global batch of lr_ref_batch; scaled by sqrt(global_batch / lr_ref_batch)
    lr_ref_batch: int = 4096  # reference global CLIP batch of `lr`
    betas: tuple = (0.9, 0.98)  # AdamW betas
    eps: float = 1e-6  # AdamW eps
    weight_decay: float = 0.05  # AdamW weight decay (none on norms, biases, tokens, logit_scale)
    warmup_frac: float = 0.05  # linear warm-up, fraction of max_steps
    min_lr_frac: float = 0.01  # cosine decays to this fraction of the peak lr
    grad_clip: float = 3.0  # max global gradient norm (0 = off)
    teacher_momentum: float = 0.992  # teacher EMA momentum at step 0 (cosine to teacher_momentum_final)
    teacher_momentum_final: float = 1.0  # teacher EMA momentum at the last step
    stage2_lr: float = 1e-4  # stage 2 (decoder + discriminator) AdamW lr


@dataclass
class TrainConfig:
    stage: int = 1  # 1 = joint pre-training, 2 = decoder GAN fine-tuning
    out_dir: str = "runs/pretrain"  # checkpoints, config.json, metrics.jsonl and previews go here
    init_from: str = ""  # stage 2: stage-1 checkpoint (file or folder); empty = latest in out_dir
    max_steps: int = 2000  # optimizer steps
    accum_steps: int = 1  # gradient accumulation micro-steps per optimizer step
    log_every: int = 20  # steps between log lines / metrics.jsonl rows
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)
    preview_every: int = 500  # steps between reconstruction preview PNGs
    resume: bool = False  # continue from the latest checkpoint in out_dir
    amp: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    compile: bool = False  # torch.compile the training module
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    seed: int = 0  # seed of every torch.Generator (offset by rank)


@dataclass
class DiTConfig:
    model: str = "tiny"  # DiT size preset: tiny | S | B | L | XL
    tokenizer: str = ""  # stage-1/2 tokenizer checkpoint (file or folder) whose latents the DiT models
    out_dir: str = "runs/dit"  # latents cache, checkpoints, metrics and sample grids
    patch_size: int = 1  # DiT patch over the latent grid (1 or 2)
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    batch_size: int = 32  # per-process batch
    max_steps: int = 2000  # optimizer steps
    lr: float = 2e-4  # AdamW lr (constant)
    betas: tuple = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.0  # AdamW weight decay
    ema_decay: float = 0.9999  # EMA of the DiT weights
    t_mu: float = -0.5  # logit-normal timestep mean (-0.75 for L)
    t_sigma: float = 1.25  # logit-normal timestep std (1.0 for L)
    cos_weight: float = 1.0  # weight of the cosine term of the flow-matching loss
    num_sample_steps: int = 250  # ODE steps at sampling
    sampler: str = "euler"  # "euler" | "heun"
    time_shift: float = 0.075  # s of the shifted time grid t' = s*t / (1 + (s-1)*t)
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = none)
    cfg_interval: tuple = (0.0, 1.0)  # t-range where guidance is applied
    num_cache_images: int = 10000  # images to encode into the latent cache (builtin / cap for folders)
    stats_images: int = 10000  # unflipped latents for the per-channel mean/std
    log_every: int = 20  # steps between log lines
    ckpt_every: int = 500  # steps between checkpoints
    sample_every: int = 500  # steps between sample grids


@dataclass
class EvalConfig:
    inception_path: str = ""  # pt_inception-2015-12-05-6726825d.pth; without it FD_vtp replaces FID
    out: str = "runs/eval/results.json"  # where the results JSON goes
    batch_size: int = 64  # images per forward
    num_images: int = 1000  # images for zero-shot / probe / recon / reference statistics
    num_gen: int = 1000  # generated samples for gFID / FD_vtp
    knn_k: int = 20  # k of the k-NN classifier


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
    train: TrainConfig = field(default_factory=TrainConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
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


def _model_sizes(width, depth, heads, dec_width, dec_depth, dec_heads):
    return dict(width=width, depth=depth, num_heads=heads), dict(width=dec_width, depth=dec_depth, num_heads=dec_heads)


def _released_preset(name, width, depth, heads, drop_path_ssl):
    """S/B/L as released (RECIPE §2-4): 256 px, patch 16, f16d64, CLIP text tower, decoder mirrors the encoder."""
    c = Config(preset=name)
    c.encoder = EncoderConfig(image_size=256, patch_size=16, width=width, depth=depth, num_heads=heads,
                              latent_dim=64, drop_path_ssl=drop_path_ssl)
    c.decoder = DecoderConfig(width=width, depth=depth, num_heads=heads)
    c.text = TextConfig(vocab_size=49408, context_length=77, width=768, depth=12, num_heads=12, embed_dim=768)
    c.head = HeadConfig(hidden_dim=2048, bottleneck_dim=256, num_prototypes=65536)
    c.data = DataConfig(batch_size=512, ssl_batch_size=128, rec_batch_size=64, num_workers=8)
    c.optim = OptimConfig()
    c.train = TrainConfig(max_steps=100_000, log_every=50, ckpt_every=2000, preview_every=2000)
    return c


def _tiny_preset():
    c = Config(preset="tiny")  # the dataclass defaults are the tiny preset
    c.optim = OptimConfig(lr=2e-3, lr_ref_batch=64, warmup_frac=0.05)
    return c


PRESETS = {
    "tiny": _tiny_preset,
    "S": lambda: _released_preset("S", 384, 12, 6, 0.1),
    "B": lambda: _released_preset("B", 768, 12, 12, 0.1),
    "L": lambda: _released_preset("L", 1024, 24, 16, 0.2),
}

# Fields with a closed set of valid values: checked at start-up with the choices in the message.
CHOICES = {
    "preset": tuple(PRESETS),
    "encoder.rope_dtype": ("bf16", "fp32"),
    "loss.teacher_norm": ("sinkhorn", "centering"),
    "data.dataset": ("builtin", "folder", "jsonl", "tar", "imagenet"),
    "train.stage": (1, 2),
    "train.amp": ("auto", "bf16", "fp16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "dit.model": ("tiny", "S", "B", "L", "XL"),
    "dit.patch_size": (1, 2),
    "dit.sampler": ("euler", "heun"),
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
    for key in ("encoder.drop_path_clip", "encoder.drop_path_ssl", "encoder.drop_path_rec", "data.mask_prob",
                "dit.class_dropout"):
        need(0.0 <= _get(cfg, key) < 1.0 or key == "data.mask_prob" and _get(cfg, key) == 1.0, key, "must be in [0, 1)")
    for key in ("loss.lambda_rec", "loss.lambda_ssl", "loss.lambda_clip", "loss.l1_weight", "loss.lpips_weight",
                "loss.koleo_weight", "optim.weight_decay", "optim.grad_clip"):
        need(_get(cfg, key) >= 0, key, "must be >= 0")
    need(cfg.loss.lambda_rec + cfg.loss.lambda_ssl + cfg.loss.lambda_clip > 0, "loss.lambda_rec",
         "at least one of loss.lambda_rec, loss.lambda_ssl, loss.lambda_clip must be > 0")
    for key in ("data.batch_size", "data.ssl_batch_size", "data.rec_batch_size", "train.max_steps",
                "train.accum_steps", "train.log_every", "train.ckpt_every", "train.preview_every", "optim.lr_ref_batch",
                "dit.batch_size", "dit.max_steps", "dit.num_sample_steps"):
        need(_get(cfg, key) >= 1, key, "must be >= 1")
    b = cfg.data.batch_size
    need(cfg.data.ssl_batch_size <= b, "data.ssl_batch_size", f"must be <= data.batch_size={b}")
    need(cfg.data.rec_batch_size <= b, "data.rec_batch_size", f"must be <= data.batch_size={b}")
    for key in ("data.global_crop_scale", "data.local_crop_scale", "data.mask_ratio", "data.mask_aspect",
                "optim.betas", "dit.betas", "dit.cfg_interval"):
        v = _get(cfg, key)
        need(len(v) == 2 and v[0] <= v[1], key, "must be two numbers lo,hi with lo <= hi")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(0.0 < cfg.dit.time_shift, "dit.time_shift", "must be > 0")
    return cfg


def _get(cfg, key):
    for p in key.split("."):
        cfg = getattr(cfg, p)
    return cfg


def parse_config(argv=None, aliases=None):
    """
    Build the Config from `--preset=NAME` (default tiny) and typed `--key=value` overrides, dotted for nested
    fields (`--encoder.depth=4`). `aliases` maps short keys to dotted ones (e.g. {"tokenizer": "dit.tokenizer"}).
    A bare `--flag` sets a bool field to True. Raises ConfigError naming the field on any bad key or value.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    aliases = aliases or {}
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
    for key, raw in pairs:
        if key != "preset":
            set_config_value(cfg, key, raw)
    return validate_config(cfg)


def config_summary(cfg):
    """The final config as `key=value` lines, for the start-up print."""
    return "\n".join(f"  {k}={_get(cfg, k)}" for k in _all_keys(cfg))


# -----------------------------------------------------------------------------
# Shared utilities: distributed setup, rank-0 printing, atomic checkpoints.


def setup_distributed(device="auto"):
    """
    Initialize DDP when launched by torchrun (RANK set): nccl on CUDA, gloo on CPU.
    Returns (rank, world_size, local_rank, device). Without torchrun: (0, 1, 0, device).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
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
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return rank, world_size, local_rank, dev


def cleanup_distributed():
    """Barrier, then destroy the process group (avoids gloo aborts at exit). Delete DDP wrappers first."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def save_checkpoint(path, state):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_checkpoint(folder, prefix="ckpt_"):
    """Path of `{prefix}{step}.pt` with the largest step in `folder`, or None."""
    if not os.path.isdir(folder):
        return None
    pat = re.compile(re.escape(prefix) + r"(\d+)\.pt$")
    found = [(int(m.group(1)), n) for n in os.listdir(folder) if (m := pat.match(n))]
    return os.path.join(folder, max(found)[1]) if found else None
