"""
Evaluation of a VTP tokenizer and of a DiT trained on its latents (RECIPE §8).

    python evaluate.py zero-shot --ckpt=runs/pretrain      # CLIP zero-shot top-1 / top-5 with prompt templates
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
for comparing runs against each other, but its values are not comparable with published FID numbers.

The file reads top to bottom: FID Inception-v3 -> Fréchet distance / Inception Score -> PSNR / SSIM -> zero-shot
-> linear probe / k-NN -> the four subcommands -> the CLI.
"""

import json
import os
import sys
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

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

# Simple templates for the built-in synthetic shapes (their captions name a shape, its colour and background).
SIMPLE_TEMPLATES = ["a {}.", "a {} shape.", "a drawing of a {}.", "a picture of a {}.", "a small {}.", "a large {}."]


# -----------------------------------------------------------------------------
# Distributed helper: every collective of this file goes through it, a no-op in a single process.


def gather_cat(x):
    """
    Concatenate a (n_r, ...) tensor of every rank along dim 0, in rank order (n_r may differ between ranks).
    Returns `x` unchanged in a single process. Rows of several tensors gathered in the same order stay aligned.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    # Collectives on a CUDA tensor need nccl; gloo wants CPU tensors. Use the backend's device.
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = torch.zeros((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=dev)  # (n_max, ...)
    pad[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


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
