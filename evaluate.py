"""
Evaluation of a VTP tokenizer and of a DiT trained on its latents (the README's Method §8).

    python evaluate.py judge                               # train (once) the built-in data's CNN judge, runs/judge
    python evaluate.py zero-shot --ckpt=runs/pretrain      # CLIP zero-shot top-1 / top-5 with prompt templates
    python evaluate.py retrieval --ckpt=runs/pretrain      # image<->text recall@1/5/10 on the val captions
    python evaluate.py probe     --ckpt=runs/pretrain      # linear probe (lr grid, best on val) + k-NN
    python evaluate.py recon     --ckpt=runs/pretrain      # PSNR, SSIM, rFID (or rFD_vtp), LPIPS, a side-by-side PNG
    python evaluate.py gen       --dit_ckpt=runs/dit       # gFID (or gFD_vtp) and Inception Score of DiT samples
    python evaluate.py all       --ckpt=runs/pretrain --dit_ckpt=runs/dit

Any `--key=value` of the shared config works (`--eval.num_images=5000`, `--data.dataset=imagenet`, ...). The data
config defaults to the checkpoint's own and is overridden by explicit `--data.*` flags. Under torchrun every rank
takes a disjoint shard of the images and the features are gathered before the metrics are computed on every rank
(rank 0 prints and writes the JSON).

FID vs FD_vtp. FID needs the standard FID Inception-v3 weights (`pt_inception-2015-12-05-6726825d.pth`, given with
`--eval.inception_path`); they cannot be downloaded here. Without them, the Fréchet distance is computed in the
feature space of a VTP tokenizer (normed [CLS] ++ mean patch token) and is labelled FD_vtp everywhere: it is useful
for comparing runs against each other when they share the judge (`--eval.fd_ckpt`; by default the evaluated
tokenizer itself, which is a lenient judge of its own reconstructions), but its values are not comparable with
published FID numbers.

The file reads top to bottom: prompt templates -> Fréchet distance / Inception Score -> PSNR / SSIM -> zero-shot
-> linear probe / k-NN -> feature extraction -> the judge -> the subcommands -> the FID Inception-v3 network they
use -> the CLI.
"""

import copy
import hashlib
import json
import os
import re
import sys
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data import (BUILTIN_VERSION, build_dataset, build_eval_loader, build_tokenizer, denormalize, normalize,
                  tokenizer_from_state)
from losses import LPIPS
from model import (Config, ConfigError, amp_setup, cleanup_distributed, gather_cat, load_vtp, parse_config, print0,
                   resolve_checkpoint, run_cli, save_checkpoint, seeded, set_config_value, setup_distributed,
                   validate_config)
from train_dit import sample_images, tokenizer_fingerprint, tokenizer_path_of

# -----------------------------------------------------------------------------
# Prompt templates for zero-shot classification.

# The 80 ImageNet prompt templates of CLIP (Radford et al. 2021), used for class-folder / ImageNet data.
CLIP_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]

# Simple templates for the built-in scenes, whose captions name the main shape with its size, colour and place
# ("a small red circle in the centre"); the label is that shape.
SIMPLE_TEMPLATES = ["a {}", "a {}.", "there is a {}", "a picture of a {}", "a {} shape.", "a drawing of a {}.",
                    "a small {}", "a large {}", "a {} in the centre"]


# -----------------------------------------------------------------------------
# Fréchet distance and Inception Score (statistics in float64).


def feature_statistics(features):
    """(N, F) features -> (mu (F,), sigma (F, F)) in float64; sigma is the unbiased covariance (N >= 2)."""
    x = np.asarray(features.double().cpu().numpy() if torch.is_tensor(features) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, F) for statistics, got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def save_statistics(path, mu, sigma, **meta):
    """Write `mu`, `sigma` (and any extra scalar/string metadata) to an .npz file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_statistics(path):
    """Read (mu, sigma) from an .npz written by `save_statistics` (or any .npz with `mu` and `sigma`)."""
    with np.load(path) as f:
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """
    Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).
    If the matrix square root fails (singular product: a warning or non-finite values), eps*I is added to both
    covariances and it is retried. A complex result with max |imag| > 1e-3 on the diagonal raises; otherwise
    the real part is used (tiny imaginary parts are round-off).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if caught or not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(f"Fréchet distance: matrix square root has imaginary component {max_imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits, splits=10):
    """
    Inception Score exp(E_x KL(p(y|x) || p(y))) from (N, 1008) logits, in float64, over `splits` disjoint parts
    (10 as in the original code; fewer when N is small). Returns (mean, std) over the parts.
    """
    logits = torch.as_tensor(logits).double()
    p = torch.softmax(logits, dim=1)  # (N, 1008)
    scores = []
    for part in torch.tensor_split(p, min(splits, p.shape[0])):
        py = part.mean(dim=0, keepdim=True)  # (1, 1008) marginal of this part
        kl = (part * (torch.log(part + 1e-12) - torch.log(py + 1e-12))).sum(dim=1).mean()
        scores.append(torch.exp(kl).item())
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# Reconstruction metrics on [0, 1] images.


def quantize(images):
    """[0, 1] floats -> the nearest 8-bit level, as when the image is saved as a PNG. (B, 3, H, W)."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def psnr(x, y):
    """
    Per-image PSNR in dB between (B, 3, H, W) images in [0, 1] (peak 1): 10 log10(1 / MSE), MSE over all pixels
    and channels, in float64; +inf for identical images. Pass 8-bit quantized images (`quantize`) to match the
    usual protocol, where reconstructions are saved as PNGs first. Returns (B,).
    """
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10 * torch.log10(1.0 / mse)


def gaussian_window(size=11, sigma=1.5):
    """Normalized 2D Gaussian window (size, size), the outer product of a 1D Gaussian, in float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x, y, window_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """
    Per-image SSIM (Wang et al. 2004) between (B, C, H, W) images in [0, 1] (data range 1): local means,
    variances and covariance under an 11x11 Gaussian window (sigma 1.5), computed per channel over the valid
    region (no padding), C1 = (0.01)^2, C2 = (0.03)^2; the SSIM map is averaged over channels and positions.
    Returns (B,) in float64; 1 for identical images.
    """
    x, y = x.double(), y.double()
    c = x.shape[1]
    w = gaussian_window(window_size, sigma).to(x.device).expand(c, 1, window_size, window_size)  # (C, 1, k, k)

    def blur(t):
        return F.conv2d(t, w, groups=c)  # (B, C, H-k+1, W-k+1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


# -----------------------------------------------------------------------------
# Zero-shot classification (CLIP protocol).


@torch.no_grad()
@torch.no_grad()
def zero_shot_classifier(model, tokenizer, class_names, templates, device="cpu"):
    """
    One text embedding per class: every template filled with the class name, `model.text_features` of each
    prompt (L2-normalized), averaged over the templates and renormalized. Returns (E, C) weights so that
    `image_features @ weights` gives (B, C) cosine logits.
    """
    weights = []
    for name in tqdm(class_names, desc="zero-shot text", disable=_not_rank0()):
        tokens = tokenizer([t.format(name) for t in templates]).to(device)  # (T, context_length)
        f = model.text_features(tokens, normalize=True).float()  # (T, E)
        weights.append(F.normalize(f.mean(dim=0), dim=-1))  # (E,)
    return torch.stack(weights, dim=1)  # (E, C)


def topk_accuracy(logits, labels, ks=(1, 5)):
    """{"top1": %, "top5": %} of (N, C) logits against (N,) labels; k is capped at C."""
    out = {}
    for k in ks:
        topk = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
        out[f"top{k}"] = 100.0 * (topk == labels[:, None]).any(dim=1).float().mean().item()
    return out


# -----------------------------------------------------------------------------
# Linear probe and k-NN on cached frozen features.


def linear_probe(train_x, train_y, val_x, val_y, num_classes, lrs=(0.001, 0.01, 0.1, 1.0), epochs=100,
                 batch_size=256, seed=0):
    """
    Train one linear classifier per learning rate on frozen (N, F) features and keep the best on val (the
    selection protocol of the released scripts). Features are standardized with the train mean/std (like MAE's
    affine-free BatchNorm before the head), the head starts at zero, and it is trained with SGD (momentum 0.9, no
    weight decay), a cosine learning rate from lr to 0, cross-entropy, and shuffled mini-batches from a seeded
    generator. Returns {"top1": best val top-1 %, "top5": its top-5, "best_lr": lr, "per_lr": {lr: top-1}}.
    """
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std  # (N, F)
    n = train_x.shape[0]
    steps_per_epoch = max(1, (n + batch_size - 1) // batch_size)
    total = epochs * steps_per_epoch
    results = {}
    for lr in tqdm(lrs, desc="linear probe lr grid", disable=_not_rank0()):
        head = nn.Linear(train_x.shape[1], num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        step = 0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                for g in opt.param_groups:  # cosine from lr to 0 over all steps
                    g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / total))
                loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        with torch.no_grad():
            results[lr] = topk_accuracy(head(val_x), val_y)
    best_lr = max(results, key=lambda k: results[k]["top1"])
    return {"top1": results[best_lr]["top1"], "top5": results[best_lr]["top5"], "best_lr": best_lr,
            "per_lr": {str(k): v["top1"] for k, v in results.items()}}


@torch.no_grad()
def knn_classify(train_x, train_y, val_x, num_classes, k=20, temperature=0.07, chunk=1024):
    """
    Weighted k-NN classifier of DINO (Caron et al. 2021) on cosine similarity: each of the k nearest train
    features votes for its label with weight exp(sim / 0.07); the class with the largest total wins.
    (N_train, F), (N_train,), (N_val, F) -> (N_val, C) vote totals (use `topk_accuracy` on them).
    """
    train_x, val_x = F.normalize(train_x.float(), dim=1), F.normalize(val_x.float(), dim=1)
    k = min(k, train_x.shape[0])
    votes = []
    for i in range(0, val_x.shape[0], chunk):
        sim = val_x[i:i + chunk] @ train_x.t()  # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (n, k)
        one_hot = F.one_hot(train_y[top_idx], num_classes).float()  # (n, k, C)
        votes.append((one_hot * (top_sim / temperature).exp()[..., None]).sum(dim=1))  # (n, C)
    return torch.cat(votes)


def _not_rank0():
    """True on ranks other than 0 (used to silence their progress bars)."""
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


# -----------------------------------------------------------------------------
# Feature extraction (frozen models; features cached in memory and gathered across ranks).


class FDFeatures:
    """
    The feature space of a Fréchet distance. With Inception weights: the 2048-d pool3 of FIDInceptionV3 (FID)
    and its 1008 logits (Inception Score). Without: a VTP tokenizer's normed [CLS] concatenated with its mean
    patch token (FD_vtp; no Inception Score). Both run in fp32.
    __call__(images (B, 3, H, W) in [0, 1]) -> (features (B, F), logits (B, 1008) or None), float32.
    """

    def __init__(self, inception=None, vtp=None, space=""):
        self.inception, self.vtp, self.space = inception, vtp, space
        self.name = "FID" if inception is not None else "FD_vtp"  # never call FD_vtp "FID"

    @torch.no_grad()
    def __call__(self, images):
        if self.inception is not None:
            pool, logits = self.inception(images.float())
            return pool.float(), logits.float()
        f = self.vtp.features(normalize(images.float()))
        return torch.cat([f["cls"], f["patches"].mean(dim=1)], dim=1).float(), None  # (B, 2D)


@torch.no_grad()
def probe_features(model, images, kind="cls_patch", n_blocks=1):
    """
    Frozen features for the linear probe / k-NN (Method §8). `cls_patch`: the normed [CLS] of each of the last
    n_blocks blocks and the mean patch token of the last block, concatenated -> (B, (n_blocks + 1) D). `cls`: the
    normed [CLS] of the last n_blocks blocks alone -> (B, n_blocks D) (DINO's k-NN features at n_blocks 1).
    `latent`: the bottleneck latent averaged over positions -> (B, latent_dim) (the paper's scaling plots).
    """
    if kind == "latent":
        return model.encode(images).float().mean(dim=(2, 3))  # (B, latent_dim)
    layers = model.intermediate_layers(images, n_blocks)
    parts = [layer["cls"] for layer in layers] + ([layers[-1]["patches"].mean(dim=1)] if kind == "cls_patch" else [])
    return torch.cat(parts, dim=1).float()  # (B, (n_blocks + 1) D), or (B, n_blocks D) for `cls`


def _amp(cfg, device):
    """An autocast region for the tokenizer forwards: run.amp on CUDA ("auto" = bf16), fp32 on a CPU (as DiT
    sampling)."""
    return amp_setup(cfg.run.amp if device.type == "cuda" else "fp32", device)[0]()


# -----------------------------------------------------------------------------
# The judge of the built-in data (Method §8) [ours]. FID needs Inception weights trained on ImageNet, and FD_vtp
# scores each tokenizer in its own feature space, so neither compares tokenizers on the built-in scenes. The judge
# is a small CNN shape classifier trained once, deterministically, and saved: its accuracy on generated samples
# says whether they show their class, and the Fréchet distance in its 128-d penultimate space (FD_judge) puts the
# reconstructions and generations of every tokenizer on one scale.

JUDGE_BATCH, JUDGE_LR, JUDGE_VAL_IMAGES = 128, 2e-3, 1000  # its scenes and epochs: eval.judge_images / judge_epochs


class ShapeJudge(nn.Module):
    """ImageNet-normalized (B, 3, S, S) -> conv stack -> global max-pool -> `features` (B, 128) -> logits (B, C)."""

    def __init__(self, num_classes):
        super().__init__()
        conv = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]  # noqa: E731
        self.features = nn.Sequential(*conv(3, 32), *conv(32, 64), nn.MaxPool2d(2), *conv(64, 64), nn.MaxPool2d(2),
                                      *conv(64, 128), nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def labelled_images(cfg, split, size, n):
    """The first n images of `split` at `size` px (ImageNet-normalized, on the CPU) and their labels."""
    xs, ys = [], []
    for batch in build_eval_loader(cfg, split, size, 256, max_images=n):
        xs.append(batch["images"])
        ys.append(batch["labels"].long())
    return torch.cat(xs), torch.cat(ys)


def train_judge(x, y, num_classes, epochs, seed=0, batch_size=JUDGE_BATCH, lr=JUDGE_LR):
    """
    Train a ShapeJudge on images x (N, 3, S, S) with labels y (N,). Deterministic: the initialization and every
    draw (order, flips) come from `seed`, never from the global RNG, so a seed gives bit-identical weights.
    """
    with seeded(seed):
        judge = ShapeJudge(num_classes)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            flip = torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5  # the DiT sees flipped images too
            loss = F.cross_entropy(judge(torch.where(flip, x[idx].flip(-1), x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_outputs(judge, images, batch_size=256):
    """(features (N, 128), logits (N, C)) of ImageNet-normalized images, in batches, float32 on the CPU."""
    feats, logits = [], []
    device = next(judge.parameters()).device
    for i in range(0, len(images), batch_size):
        f = judge.features(images[i:i + batch_size].to(device).float())
        feats.append(f.cpu())
        logits.append(judge.fc(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def load_judge(cfg, size, device="cpu"):
    """
    The judge of the built-in data at `size` px: loaded from eval.judge_dir if trained before, else trained on the
    first eval.judge_images training scenes for eval.judge_epochs from eval.judge_seed, scored on the val split and
    saved there. Returns (ShapeJudge, info dict with its val accuracy and path).
    """
    if cfg.data.dataset != "builtin":
        raise ConfigError(f"the judge knows only the built-in scenes, not data.dataset={cfg.data.dataset!r}")
    e = cfg.eval
    folder, seed, num_images, epochs = e.judge_dir, e.judge_seed, e.judge_images, e.judge_epochs
    name = f"judge_{size}px_v{BUILTIN_VERSION}_data{cfg.data.seed}_seed{seed}_n{num_images}_e{epochs}.pt"
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        judge = ShapeJudge(state["num_classes"])
        judge.load_state_dict(state["model"])
        info = {**state["info"], "path": path}  # where it was loaded from, not where it was trained
    else:
        print0(f"training the judge on {num_images} built-in scenes at {size} px (once; saved to {path}) ...")
        x, y = labelled_images(cfg, "train", size, num_images)
        num_classes = int(y.max()) + 1
        judge = train_judge(x, y, num_classes, epochs, seed)
        xv, yv = labelled_images(cfg, "val", size, JUDGE_VAL_IMAGES)
        acc = (judge_outputs(judge, xv)[1].argmax(1) == yv).float().mean().item()
        info = {"val_accuracy": acc, "num_val": len(yv), "size": size, "seed": seed, "num_images": num_images,
                "epochs": epochs, "path": path}
        if not _not_rank0():
            save_checkpoint(path, {"model": judge.state_dict(), "num_classes": num_classes, "info": info})
    print0(f"judge: {path}, accuracy {info['val_accuracy']:.4f} on {info['num_val']} real val scenes")
    return judge.to(device).eval().requires_grad_(False), info


# -----------------------------------------------------------------------------
# Shared state of one evaluation run.


class Evaluator:
    """
    What the subcommands share: the CLI config, the explicit `--key=value` overrides, rank / world size / device,
    and the models, each loaded once on first use (VTP tokenizer, FID Inception, LPIPS).
    """

    def __init__(self, cli, overrides, rank=0, world_size=1, device=torch.device("cpu")):
        self.cli, self.overrides = cli, overrides
        self.rank, self.world_size, self.device = rank, world_size, device
        self._vtp, self._inception, self._lpips, self._judges, self._shape_judges = None, None, False, {}, {}

    def merge(self, base):
        """The evaluation config: `base` (a checkpoint's config: architecture, data) with this run's eval and
        run sections and the explicit `--data.*`, `--loss.*` (LPIPS paths) and `--text.tokenizer` flags on top."""
        cfg = copy.deepcopy(base)
        cfg.eval, cfg.run = copy.deepcopy(self.cli.eval), copy.deepcopy(self.cli.run)
        for key, raw in self.overrides:
            if key.split(".")[0] in ("data", "loss") or key == "text.tokenizer":
                set_config_value(cfg, key, raw)
        return validate_config(cfg)

    def vtp(self):
        """(VTP in eval mode, evaluation Config, checkpoint dict) of eval.ckpt."""
        if self._vtp is None:
            if not self.cli.eval.ckpt:
                raise ConfigError("eval.ckpt is empty: pass --ckpt=<checkpoint file, run folder (latest ckpt_*.pt), "
                                  "or released folder with config.json + model.safetensors>")
            model, cfg, ckpt = load_vtp(self.cli.eval.ckpt, self.device)
            self._vtp = (model.requires_grad_(False), self.merge(cfg), ckpt)
        return self._vtp

    def fd_features(self, vtp_path=""):
        """
        FDFeatures: Inception when eval.inception_path is set; else FD_vtp with the tokenizer of eval.fd_ckpt
        (a fixed judge, to compare tokenizers with each other), else `vtp_path`, else eval.ckpt's.
        """
        e = self.cli.eval
        if e.inception_path:
            if self._inception is None:
                self._inception = load_fid_inception(e.inception_path, self.device)
            return FDFeatures(inception=self._inception, space="inception-2015-12-05")
        path = e.fd_ckpt or vtp_path or e.ckpt
        if not path:
            raise ConfigError("FD_vtp (no --eval.inception_path) needs a tokenizer: pass --ckpt or --eval.fd_ckpt")
        if path == e.ckpt:
            vtp = self.vtp()[0]
        else:
            if path not in self._judges:
                self._judges[path] = load_vtp(path, self.device)[0].requires_grad_(False)
            vtp = self._judges[path]
        return FDFeatures(vtp=vtp, space=f"vtp:{path}")

    def shape_judge(self, cfg, size):
        """The built-in data's ShapeJudge at `size` px (load_judge; its `info` attribute has its val accuracy), or
        None for other data."""
        if cfg.data.dataset != "builtin":
            return None
        if size not in self._shape_judges:
            judge, info = load_judge(cfg, size, self.device)
            judge.info = info
            self._shape_judges[size] = judge
        return self._shape_judges[size]

    def lpips(self, cfg):
        """LPIPS from losses.py with loss.lpips_vgg_path / lpips_lin_path, or None (with a note) without them."""
        if self._lpips is False:
            vgg, lin = cfg.loss.lpips_vgg_path, cfg.loss.lpips_lin_path
            if not (vgg and lin):
                print0("LPIPS skipped: no weights given (--loss.lpips_vgg_path and --loss.lpips_lin_path)")
                self._lpips = None
            else:
                self._lpips = LPIPS().load_weights(vgg, lin).to(self.device)
        return self._lpips

    def loader(self, cfg, split, num_images, image_size=None, squash=False):
        """This rank's disjoint shard of the first `num_images` images of `split`: ADM centre crops, or squashed to
        the model's size without cropping (squash=True, the zero-shot protocol)."""
        return build_eval_loader(cfg, split, image_size or cfg.encoder.image_size, cfg.eval.batch_size,
                                 rank=self.rank, world_size=self.world_size, max_images=num_images, squash=squash)

    def bar(self, iterable, desc):
        """tqdm on rank 0 only."""
        return tqdm(iterable, desc=desc, disable=self.rank != 0)


# -----------------------------------------------------------------------------
# The subcommands. Each returns a dict of results (identical on every rank).


def _class_names(cfg):
    """Class names in label order: eval.class_names (a text file, one per line) or the val dataset's class_names."""
    if cfg.eval.class_names:
        with open(cfg.eval.class_names) as f:
            return [line.strip() for line in f if line.strip()]
    return list(getattr(build_dataset(cfg, "val"), "class_names", None) or [])


def _text_tokenizer(cfg, ckpt):
    """The checkpoint's own text tokenizer, or (released checkpoints) the CLIP BPE file of --text.tokenizer."""
    if ckpt.get("tokenizer") is not None:
        return tokenizer_from_state(ckpt["tokenizer"])
    if cfg.text.tokenizer != "bpe" and not os.path.isfile(cfg.text.tokenizer):
        raise ConfigError(f"text.tokenizer={cfg.text.tokenizer!r} not found: pass "
                          "--text.tokenizer=/path/to/bpe_simple_vocab_16e6.txt.gz (the CLIP merges file)")
    return build_tokenizer(cfg)


def run_zero_shot(E):
    """
    Zero-shot top-1 / top-5 on the val split: cosine of image features with per-class prompt embeddings. Images
    are squashed to the model's size without cropping, as in the VTP zero-shot protocol (ImageNet val at 256x256);
    the other subcommands read ADM centre crops (the same thing for square images such as the built-in scenes).
    """
    model, cfg, ckpt = E.vtp()
    names = _class_names(cfg)
    if not names:
        return {"skipped": f"data.dataset={cfg.data.dataset} has no class names (give --eval.class_names=FILE)"}
    if all(re.fullmatch(r"n\d{8}", n) for n in names):
        print0("note: class names are WordNet ids (n0...): pass --eval.class_names=FILE with readable names")
    choice = cfg.eval.templates
    if choice == "auto":
        choice = "simple" if cfg.data.dataset == "builtin" else "clip"
    templates = SIMPLE_TEMPLATES if choice == "simple" else CLIP_TEMPLATES
    amp = _amp(cfg, E.device)
    with amp:
        weights = zero_shot_classifier(model, _text_tokenizer(cfg, ckpt), names, templates, E.device)  # (E, C)
    logits, labels = [], []
    for batch in E.bar(E.loader(cfg, "val", cfg.eval.num_images, squash=True), "zero-shot images"):
        with torch.no_grad(), amp:
            f = model.image_features(batch["images"].to(E.device), normalize=True)
        logits.append((F.normalize(f.float(), dim=-1) @ weights).cpu())  # (b, C)
        labels.append(_labels(batch))
    logits, labels = gather_cat(torch.cat(logits)), gather_cat(torch.cat(labels))
    if (labels < 0).any():
        return {"skipped": f"data.dataset={cfg.data.dataset} has no class labels"}
    return {**topk_accuracy(logits, labels), "num_images": len(labels), "num_classes": len(names),
            "templates": f"{choice} ({len(templates)})"}


def _labels(batch):
    """The batch's labels, or -1 for each image of unlabelled data. (b,) int64 on the CPU."""
    if "labels" in batch:
        return batch["labels"].cpu()
    return torch.full((len(batch["images"]),), -1, dtype=torch.long)


def _extract(E, model, cfg, split, desc):
    """Probe features and labels of the first eval.num_images images of `split`, gathered: ((N, F), (N,))."""
    feats, labels = [], []
    kind, n_blocks = cfg.eval.probe_features, cfg.eval.probe_blocks
    for batch in E.bar(E.loader(cfg, split, cfg.eval.num_images), desc):
        with _amp(cfg, E.device):
            feats.append(probe_features(model, batch["images"].to(E.device), kind, n_blocks).cpu())
        labels.append(_labels(batch))
    return gather_cat(torch.cat(feats)), gather_cat(torch.cat(labels))


def run_probe(E):
    """Linear probe (lr grid, best on val) and weighted k-NN on frozen features of train -> val."""
    model, cfg, _ = E.vtp()
    e = cfg.eval
    train_x, train_y = _extract(E, model, cfg, "train", "probe features (train)")
    val_x, val_y = _extract(E, model, cfg, "val", "probe features (val)")
    if (train_y < 0).any() or (val_y < 0).any():
        return {"skipped": f"data.dataset={cfg.data.dataset} has no class labels"}
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    knn = topk_accuracy(knn_classify(train_x, train_y, val_x, num_classes, e.knn_k, e.knn_temperature), val_y)
    lin = linear_probe(train_x, train_y, val_x, val_y, num_classes, lrs=e.probe_lrs, epochs=e.probe_epochs,
                       batch_size=e.probe_batch_size, seed=cfg.run.seed)
    desc = {"latent": "pooled latent", "cls": f"[CLS] of last {e.probe_blocks}",
            "cls_patch": f"[CLS] of last {e.probe_blocks} + mean patch"}[e.probe_features]
    return {"features": desc, "feature_dim": train_x.shape[1], "num_train": len(train_y), "num_val": len(val_y),
            "linear_top1": lin["top1"], "linear_top5": lin["top5"], "best_lr": lin["best_lr"],
            "per_lr_top1": lin["per_lr"], f"knn{e.knn_k}_top1": knn["top1"], f"knn{e.knn_k}_top5": knn["top5"]}


def retrieval_recall(image_feats, text_feats, text_image, ks=(1, 5, 10)):
    """
    Image-text retrieval recall@K (the clip_benchmark protocol): image_feats (I, E) and text_feats (T, E)
    L2-normalized, text_image (T,) int64 = the image each caption describes (an image may have several).
    image->text: an image is a hit when any of its captions is among its K nearest texts;
    text->image: a caption is a hit when its image is among its K nearest images. Returns percentages.
    """
    sim = text_feats.float() @ image_feats.float().t()  # (T, I)
    out = {}
    for k in ks:
        kt, ki = min(k, sim.shape[1]), min(k, sim.shape[0])
        t2i = (sim.topk(kt, dim=1).indices == text_image[:, None]).any(dim=1)  # (T,)
        top_texts = sim.topk(ki, dim=0).indices  # (ki, I): the K best captions of each image
        i2t = (text_image[top_texts] == torch.arange(sim.shape[1])[None]).any(dim=0)  # (I,)
        out[f"image_to_text_R@{k}"] = 100.0 * i2t.float().mean().item()
        out[f"text_to_image_R@{k}"] = 100.0 * t2i.float().mean().item()
    return out


def _image_keys(dataset, indices):
    """One identity per sample: its image path for map-style readers (a JSONL may list an image once per caption),
    else its index (tar shards: one caption per sample; built-in scenes)."""
    items = getattr(dataset, "items", None)
    return [items[i][0] for i in indices] if items is not None else list(indices)


def run_retrieval(E):
    """
    Image<->text retrieval recall@1/5/10 on the val split's captions (the first eval.num_images samples; several
    captions of one image are grouped by its path). Zero-shot needs class names; retrieval works on any captions.
    """
    model, cfg, ckpt = E.vtp()
    if cfg.data.dataset == "imagenet":
        return {"skipped": "data.dataset=imagenet has template captions, not descriptions of the images"}
    tokenizer, amp = _text_tokenizer(cfg, ckpt), _amp(cfg, E.device)
    img, txt, idx = [], [], []
    for batch in E.bar(E.loader(cfg, "val", cfg.eval.num_images), "retrieval"):
        with torch.no_grad(), amp:
            img.append(model.image_features(batch["images"].to(E.device)).float().cpu())
            txt.append(model.text_features(tokenizer(batch["captions"]).to(E.device)).float().cpu())
        idx.append(batch["index"].cpu())
    img, txt, idx = (gather_cat(torch.cat(x)) for x in (img, txt, idx))
    keys = _image_keys(build_dataset(cfg, "val"), idx.tolist())
    first_row = {}  # image key -> the first row (sample) showing it
    for row, k in enumerate(keys):
        first_row.setdefault(k, row)
    image_id = {k: i for i, k in enumerate(first_row)}
    text_image = torch.tensor([image_id[k] for k in keys])  # (T,) the image of each caption
    images = F.normalize(img[list(first_row.values())], dim=-1)  # (I, E): one feature per distinct image
    res = retrieval_recall(images, F.normalize(txt, dim=-1), text_image)
    return {**res, "num_images": len(first_row), "num_captions": len(keys)}


def run_recon(E):
    """PSNR / SSIM (8-bit images), LPIPS, rFID or rFD_vtp of val reconstructions, and a side-by-side PNG."""
    model, cfg, _ = E.vtp()
    fd, lpips = E.fd_features(), E.lpips(cfg)
    judge = E.shape_judge(cfg, cfg.encoder.image_size)
    out = {k: [] for k in ("psnr", "ssim", "lpips", "real", "rec", "judge_real", "judge_rec")}
    grid = None
    for batch in E.bar(E.loader(cfg, "val", cfg.eval.num_images), "reconstruction"):
        x = batch["images"].to(E.device)
        with torch.no_grad(), _amp(cfg, E.device):
            rec = model(x)
        real, fake = quantize(denormalize(x.float())), quantize(denormalize(rec.float()))  # (b, 3, H, W) in [0, 1]
        out["psnr"].append(psnr(real, fake).cpu())
        out["ssim"].append(ssim(real, fake).cpu())
        if lpips is not None:
            with torch.no_grad():
                out["lpips"].append(lpips(real * 2 - 1, fake * 2 - 1).float().cpu())
        out["real"].append(fd(real)[0].cpu())
        out["rec"].append(fd(fake)[0].cpu())
        if judge is not None:
            out["judge_real"].append(judge_outputs(judge, normalize(real))[0])
            out["judge_rec"].append(judge_outputs(judge, normalize(fake))[0])
        if grid is None:
            grid = (real[:cfg.eval.recon_grid].cpu(), fake[:cfg.eval.recon_grid].cpu())
    res = {k: gather_cat(torch.cat(v)) for k, v in out.items() if v}
    name = "r" + fd.name
    results = {"psnr": res["psnr"].mean().item(), "ssim": res["ssim"].mean().item(),
               name: frechet_distance(*feature_statistics(res["real"]), *feature_statistics(res["rec"])),
               "lpips": res["lpips"].mean().item() if "lpips" in res else None,
               "num_images": len(res["psnr"]), "fd_space": fd.space}
    if judge is not None:
        results["rFD_judge"] = frechet_distance(*feature_statistics(res["judge_real"]),
                                                *feature_statistics(res["judge_rec"]))
    if E.rank == 0:
        results["grid_png"] = save_pair_grid(_side_path(cfg, "recon.png"), *grid)
    return results


def _side_path(cfg, name):
    """A file next to the results JSON: runs/eval/results.json -> runs/eval/results_{name}."""
    return os.path.splitext(cfg.eval.out)[0] + "_" + name


def save_pair_grid(path, top, bottom=None):
    """Save (n, 3, H, W) [0, 1] images as one row (above `bottom`'s row when given) to a PNG; returns the path."""
    rows = [top] + ([bottom] if bottom is not None else [])
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*H, n*W)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path


def _generated_images(E):
    """
    This rank's share of the generated images as uint8 (n, H, W, 3): a slice of eval.gen_npz (key arr_0, as
    written by `train_dit.py sample`, or images), or samples of eval.dit_ckpt's EMA DiT (train_dit.sample_images,
    guidance eval.cfg_scale, else the checkpoint's). Returns (images, their class labels (n,) int64 or None when
    unknown, the DiT checkpoint dict or None, a description of the source). DiT sample i has class
    i % num_classes; an .npz gives its classes under the key labels.
    """
    e = E.cli.eval
    if e.gen_npz:
        with np.load(e.gen_npz) as f:
            arr = f["arr_0"] if "arr_0" in f else f["images"]
            labels = torch.from_numpy(f["labels"]).long() if "labels" in f else None
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{e.gen_npz}: expected uint8 images (N, H, W, 3), got {arr.dtype} {arr.shape}")
        share = np.array_split(np.arange(len(arr)), E.world_size)[E.rank]
        return arr[share], labels[share] if labels is not None else None, None, e.gen_npz
    path = resolve_checkpoint(e.dit_ckpt, f"--dit_ckpt={e.dit_ckpt!r}: no DiT checkpoint there (train one with "
                                          "train_dit.py, or pass --gen_npz=samples.npz)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    images, indices = sample_images(path, e.num_gen, seed=E.cli.run.seed, batch_size=e.batch_size, device=E.device,
                                    num_steps=e.gen_steps or None, rank=E.rank, world_size=E.world_size,
                                    cfg_scale=e.cfg_scale if e.cfg_scale > 0 else None)
    return images, torch.from_numpy(indices % ckpt["dit_args"]["num_classes"]), ckpt, path


def reference_statistics(E, cfg, fd, image_size):
    """
    (mu, sigma, path) of the first eval.num_images train images (ADM centre crops at `image_size`, 8-bit) in the
    feature space of `fd`. Cached as .npz: at eval.ref_stats if given, else next to eval.out under a name that
    hashes everything the statistics depend on (feature space, data set, size, count), so a stale file is never
    reused.
    """
    meta = {"space": fd.space, "dataset": cfg.data.dataset, "split": "train", "image_size": image_size,
            "data_path": os.path.abspath(cfg.data.path) if cfg.data.path else "", "num_images": cfg.eval.num_images}
    if fd.vtp is not None:
        meta["fingerprint"] = tokenizer_fingerprint(fd.vtp)
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    path = cfg.eval.ref_stats or os.path.join(os.path.dirname(cfg.eval.out) or ".", f"ref_{fd.name}_{digest}.npz")
    if os.path.isfile(path):
        print0(f"reference statistics: {path}")
        return (*load_statistics(path), path)
    feats = []
    for batch in E.bar(E.loader(cfg, "train", cfg.eval.num_images, image_size), "reference statistics"):
        real = quantize(denormalize(batch["images"].to(E.device).float()))  # (b, 3, S, S) in [0, 1]
        feats.append(fd(real)[0].cpu())
    mu, sigma = feature_statistics(gather_cat(torch.cat(feats)))
    if E.rank == 0:
        save_statistics(path, mu, sigma, **meta)
    return mu, sigma, path


def run_gen(E):
    """gFID (or gFD_vtp) of generated images against the reference statistics; Inception Score with Inception.
    On the built-in data also the judge's class accuracy of the samples and gFD_judge."""
    images, labels, dit_ckpt, source = _generated_images(E)
    e = E.cli.eval
    # Reference data: the data the DiT was trained on, else the tokenizer's, else the defaults (+ --data.* flags).
    base = Config.from_dict(dit_ckpt["config"]) if dit_ckpt else E.vtp()[1] if e.ckpt else Config()
    cfg = E.merge(base)
    tok_path = ""
    if dit_ckpt is not None and not e.ckpt:  # FD_vtp in the space of the tokenizer the DiT was trained on
        tok_path = tokenizer_path_of(dit_ckpt)[0]  # checked against the fingerprint recorded at training
    fd = E.fd_features(tok_path)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (n, 3, H, W) in [0, 1]
    feats, logits = [], []
    for i in E.bar(range(0, len(x), e.batch_size), "generated-image features"):
        f, lg = fd(x[i:i + e.batch_size].to(E.device))
        feats.append(f.cpu())
        if lg is not None:
            logits.append(lg.cpu())
    feats = gather_cat(torch.cat(feats))
    mu_ref, sigma_ref, ref_path = reference_statistics(E, cfg, fd, x.shape[-1])
    results = {"g" + fd.name: frechet_distance(*feature_statistics(feats), mu_ref, sigma_ref),
               "num_samples": len(feats), "num_reference": cfg.eval.num_images, "reference_stats": ref_path,
               "source": source, "fd_space": fd.space}
    if logits:
        results["inception_score"], results["inception_score_std"] = inception_score(gather_cat(torch.cat(logits)))
    judge = E.shape_judge(cfg, x.shape[-1])
    if judge is not None:  # the built-in data: class accuracy and gFD_judge against the reference images
        feats, logits = judge_outputs(judge, normalize(x))
        ref = labelled_images(cfg, "train", x.shape[-1], cfg.eval.num_images)[0]  # the reference set of gFD
        ref = normalize(quantize(denormalize(ref)))  # 8-bit, like the samples
        results["gFD_judge"] = frechet_distance(*feature_statistics(gather_cat(feats)),
                                                *feature_statistics(judge_outputs(judge, ref)[0]))
        if labels is not None:
            correct = gather_cat((logits.argmax(1) == labels).float())
            results["judge_accuracy"] = correct.mean().item()
    if E.rank == 0 and len(x):
        n = min(8, len(x))
        second_row = x[n:2 * n] if len(x) >= 2 * n else None
        results["grid_png"] = save_pair_grid(_side_path(cfg, "samples.png"), x[:n], second_row)
    return results


# -----------------------------------------------------------------------------
# FID Inception-v3. The network of the TensorFlow FID code (inception-2015-12-05) as ported to PyTorch: a
# torchvision-style Inception-v3 with 1008 classes, no auxiliary head, BatchNorm eps 0.001, and Mixed blocks that
# differ from torchvision's in their pooling (average pools exclude the zero padding; Mixed_7c pools with max).
# Parameter names match `pt_inception-2015-12-05-6726825d.pth`.


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, as in the TF graph) -> ReLU. (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x):
    """3x3 stride-1 average pool whose border averages ignore the zero padding (TF's 'SAME' average pool)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1. Out: 224 + pool_features channels."""

    def __init__(self, in_ch, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a, grid reduction 35 -> 17: stride-2 3x3 | 1x1->3x3->stride-2 3x3 | maxpool. Out: 480 + in_ch."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b-e (17x17), factorized 7x7 convolutions with c7 inner channels. Out: 768 channels."""

    def __init__(self, in_ch, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a, grid reduction 17 -> 8: 1x1->stride-2 3x3 | 1x1->1x7->7x1->stride-2 3x3 | maxpool. Out: 512+in."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """
    Mixed_7b/c (8x8), with 1x3 / 3x1 splits. Out: 2048 channels. The FID variant pools with an average that
    ignores the padding in Mixed_7b (`max_pool=False`) and with a 3x3 max pool in Mixed_7c (`max_pool=True`).
    """

    def __init__(self, in_ch, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """
    Inception-v3 of the FID code (TF inception-2015-12-05). Input: images in [0, 1], (B, 3, H, W), any size; they
    are resized to 299x299 (bilinear) and mapped to [-1, 1]. Output: (pool (B, 2048), logits (B, 1008)), where
    pool is the 2048-d pool3 feature used by FID and logits = pool @ fc.weight^T without the bias, the unbiased
    logits that the original Inception Score code feeds to its softmax.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)  # 35x35 -> 17x17 (6a) -> 8x8 (7a); (B, 2048, 8, 8) at the end
        pool = x.mean(dim=(2, 3))  # (B, 2048)
        return pool, pool @ self.fc.weight.t()  # (B, 2048), (B, 1008)


def load_fid_inception(path, device="cpu"):
    """
    Build FIDInceptionV3 and load `pt_inception-2015-12-05-6726825d.pth` (strict: every name and shape must
    match). BatchNorm `num_batches_tracked` counters, which a converted file may lack, are filled with 0.
    Returns the network in eval mode.
    """
    net = FIDInceptionV3()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(state.get("state_dict", state)) if isinstance(state, dict) else state
    for name, buf in net.state_dict().items():
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = torch.zeros_like(buf)
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


# -----------------------------------------------------------------------------
# CLI

def run_judge(E):
    """Train (once) or load the built-in data's judge at the tokenizer's image size; report its val accuracy."""
    cfg = E.vtp()[1] if E.cli.eval.ckpt else E.merge(E.cli)
    judge = E.shape_judge(cfg, cfg.encoder.image_size)
    if judge is None:
        return {"skipped": f"the judge knows only the built-in scenes, not data.dataset={cfg.data.dataset!r}"}
    return judge.info


COMMANDS = {"judge": run_judge, "zero-shot": run_zero_shot, "retrieval": run_retrieval, "probe": run_probe,
            "recon": run_recon, "gen": run_gen}
ALIASES = {"ckpt": "eval.ckpt", "dit_ckpt": "eval.dit_ckpt", "gen_npz": "eval.gen_npz"}
USAGE = ("usage: python evaluate.py {judge,zero-shot,retrieval,probe,recon,gen,all} --ckpt=PATH "
         "[--dit_ckpt=PATH | --gen_npz=FILE] "
         "[--eval.inception_path=pt_inception-2015-12-05-6726825d.pth] [--key=value ...]")


def _explicit_overrides(argv):
    """The (dotted key, raw value) pairs given on the command line, aliases resolved."""
    pairs = []
    for arg in argv:
        key, eq, raw = arg[2:].partition("=")
        pairs.append((ALIASES.get(key, key), raw if eq else "true"))
    return pairs


def format_table(results):
    """The results as aligned `section  metric  value` lines."""
    rows = []
    for section, res in results.items():
        if not isinstance(res, dict):
            continue
        for k, v in res.items():
            if isinstance(v, dict):
                v = ", ".join(f"{a}: {b:.2f}" for a, b in v.items())
            elif isinstance(v, float):
                v = f"{v:.4f}"
            rows.append((section, k, str(v)))
    w0, w1 = (max((len(r[i]) for r in rows), default=0) for i in (0, 1))
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def main(argv=None):
    """`python evaluate.py SUBCOMMAND --key=value ...`; returns the results dict (also written to eval.out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n`python evaluate.py all --help` lists every --key=value")
        sys.exit(0)
    if not argv or argv[0] not in (*COMMANDS, "all"):
        raise ConfigError(USAGE)
    command, rest = argv[0], argv[1:]
    cli = parse_config(rest, aliases=ALIASES)
    overrides = _explicit_overrides(rest)
    rank, world_size, _, device = setup_distributed(cli.run.device)
    E = Evaluator(cli, overrides, rank, world_size, device)
    used = ("data", "eval", "run", "loss")
    ignored = [k for k, _ in overrides if k.split(".")[0] not in used and k != "text.tokenizer"]
    if ignored:
        print0(f"note: {', '.join(ignored)} ignored: the architecture comes from the checkpoint")
    fd_name = "FID" if cli.eval.inception_path else "FD_vtp"
    if fd_name == "FD_vtp":
        print0("no --eval.inception_path: Fréchet distances are FD_vtp, measured in the VTP tokenizer's feature "
               "space ([CLS] ++ mean patch), NOT FID; compare them only with each other, never with published FIDs")
    results = {"command": command, "ckpt": cli.eval.ckpt, "fd_metric": fd_name}
    for name in (COMMANDS if command == "all" else [command]):
        no_dit = not cli.eval.gen_npz and resolve_checkpoint(cli.eval.dit_ckpt) is None
        if name == "gen" and command == "all" and no_dit:
            why = f"no DiT checkpoint found at {cli.eval.dit_ckpt!r}" if cli.eval.dit_ckpt else "no --dit_ckpt given"
            print0(f"gen skipped: {why} (pass --dit_ckpt=runs/dit or --gen_npz=samples.npz)")
            results["gen"] = {"skipped": why}
            continue
        print0(f"== {name}")
        results[name] = COMMANDS[name](E)
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(cli.eval.out)), exist_ok=True)
        with open(cli.eval.out, "w") as f:
            json.dump(results, f, indent=2)
        print0(format_table(results))
        print0(f"results written to {cli.eval.out}")
    cleanup_distributed()
    return results


if __name__ == "__main__":
    run_cli(main)
