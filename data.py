"""
Data for VTP: image-caption pairs in, training and evaluation batches out.

"Towards Scalable Pre-training of Visual Tokenizers for Generation" (VTP, arXiv 2512.13687). "Method §N" refers to
the README's Method section. This file holds:

  1. ImageNet normalization and the image transforms (ADM centre crop, RandomResizedCrop, flip, colour jitter,
     grayscale, blur, solarize); their randomness comes only from seeded `torch.Generator`s passed in;
  2. DINOv2 multi-crop, iBOT block masks and the batch collate of the batch trick (Method §1.2, §5);
  3. the resumable pre-training loader, the evaluation loader, `build_dataset` and `build_tokenizer`;
  4. the text tokenizer: a byte-level BPE trained from scratch (minbpe-style) that can also load CLIP's merges file;
  5. `builtin`: procedurally drawn captioned scenes (a shape on a textured background), deterministic, no files;
  6. readers for real data: caption folders, JSONL, img2dataset tar shards, ImageNet-style class folders.

How the stage scripts use it:

    tokenizer = build_tokenizer(cfg)                # or tokenizer_from_state(ckpt["tokenizer"])
    loader = build_pretrain_loader(cfg, tokenizer, rank, world_size)
    batch = batch_to_device(next(loader), device)   # dict, see BatchMaker; uint8 images normalized on the device
    state = loader.state_dict()                     # this rank's position; a checkpoint holds every rank's (a list)
    loader.load_state_dict(states)                  # on resume: that list, on any number of processes
    for batch in build_eval_loader(cfg, "val", image_size, batch_size, rank, world_size): ...
"""

import copy
import functools
import gzip
import hashlib
import html
import io
import itertools
import json
import math
import os
import re
import sys
import tarfile
import time
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from model import ConfigError, DataConfig

# -----------------------------------------------------------------------------
# Constants

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# DINOv2 photometric augmentations (Method §5). The jitter strengths and the grayscale p are configurable for
# ablations (data.color_jitter, data.grayscale_p); their defaults, DINOv2's, live in DataConfig.
FLIP_P = 0.5
COLOR_JITTER = DataConfig.color_jitter  # brightness, contrast, saturation, hue
COLOR_JITTER_P = 0.8
GRAYSCALE_P = DataConfig.grayscale_p
BLUR_P = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
BLUR_SIGMA = (0.1, 2.0)  # pixels at DINOv2's 224-px crops ...
BLUR_REF_SIZE = 224  # ... [ours] scaled by image_size/224 below that, so a 32-px image is not blurred to a blob
SOLARIZE_P = 0.2  # global crop 2 only
SOLARIZE_THRESHOLD = 128
RRC_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of RandomResizedCrop
MASK_ATTEMPTS = 20  # tries to place one iBOT mask block

BPE_TRAIN_CAPTIONS = 10_000  # captions that build_tokenizer trains the BPE on (fewer for the builtin data)
BUILTIN_BPE_CAPTIONS = 4_000
MAX_SAMPLE_RETRIES = 50  # replacement draws for unreadable samples before a batch gives up
CHECK_SAMPLES = 16  # samples tried at start-up to prove that a data set is readable

# -----------------------------------------------------------------------------
# 1. Normalization and image transforms. Images are PIL RGB until the batch is stacked.


def normalize(x):
    """[0, 1] images, (3, H, W) or (B, 3, H, W) -> ImageNet-normalized (Method §2)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x):
    """Inverse of `normalize`: ImageNet-normalized (3, H, W) or (B, 3, H, W) -> [0, 1] (not clamped)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean


def to_tensor(img):
    """PIL RGB image -> float tensor (3, H, W) in [0, 1]."""
    return _to_uint8(img).float() / 255


def _to_uint8(img):
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)


def _stack_uint8(images):
    """Same-size PIL RGB images -> uint8 (N, 3, H, W) in [0, 255]; `batch_to_device` normalizes them on the device."""
    x = np.stack([np.asarray(im.convert("RGB")) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (N, 3, H, W)


@functools.lru_cache(maxsize=None)
def _imagenet_stats_255(device):
    """ImageNet mean and std times 255 as float32 (3, 1, 1) on `device`, made once per device: a copy of a small
    host tensor to the GPU waits for the queued work, so it must not happen every step."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1) * 255
    return mean.to(device), std.to(device)


def normalize_uint8(x):
    """uint8 images (..., 3, H, W) in [0, 255] -> ImageNet-normalized float32 on x's device, with the arithmetic of
    `_stack_normalized` ((x - 255 mean) / (255 std) in float32)."""
    mean, std = _imagenet_stats_255(x.device)
    return (x.float() - mean) / std


def _stack_normalized(images):
    """
    Same-size PIL RGB images -> ImageNet-normalized float32 (N, 3, H, W). Done in numpy, single-threaded: small torch
    ops with intra-op threads are several times slower in a busy main process (num_workers=0).
    """
    x = np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.float32)  # (N, H, W, 3)
    x -= np.array(IMAGENET_MEAN, dtype=np.float32) * 255
    x /= np.array(IMAGENET_STD, dtype=np.float32) * 255
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (N, 3, H, W)


def _rand(g):
    return torch.rand(1, generator=g).item()


def _uniform(g, lo, hi):
    return lo + (hi - lo) * _rand(g)


def _randint(g, lo, hi):
    """Uniform integer in [lo, hi], both ends included."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def adm_center_crop(img, size):
    """
    ADM-style centre crop (Method §7): halve with a BOX filter while the short side is >= 2*size, resize with
    BICUBIC so the short side is `size`, then crop the centre size x size square.
    """
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize(img, size):
    """Squash to size x size with BICUBIC (the zero-shot protocol of Method §8 resizes without cropping)."""
    return img.resize((size, size), Image.Resampling.BICUBIC)


def random_resized_crop(img, size, g, scale=(0.08, 1.0), ratio=RRC_RATIO):
    """
    Crop a random box of area fraction in `scale` and aspect ratio in `ratio` (log-uniform), resized to
    size x size with BICUBIC. After 10 failed draws, fall back to the largest centred box whose aspect is in `ratio`.
    """
    W, H = img.size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = W * H * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            top, left = _randint(g, 0, H - h), _randint(g, 0, W - w)
            break
    else:
        if W / H < ratio[0]:
            w, h = W, round(W / ratio[0])
        elif W / H > ratio[1]:
            w, h = round(H * ratio[1]), H
        else:
            w, h = W, H
        top, left = (H - h) // 2, (W - w) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))


def hflip(img):
    """Mirror left-right."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def adjust_hue(img, shift):
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) in HSV space."""
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(shift * 255)) % 256  # hue wraps around
    return Image.fromarray(hsv, "HSV").convert("RGB")


def color_jitter(img, g, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """
    Random brightness, contrast and saturation factors in [1 - s, 1 + s] and a hue shift in [-hue, hue] turns,
    applied in a random order (as torchvision's ColorJitter); a strength of 0 leaves that property alone.
    """
    for op in torch.randperm(4, generator=g).tolist():
        if op == 0 and brightness > 0:
            img = ImageEnhance.Brightness(img).enhance(_uniform(g, max(0.0, 1 - brightness), 1 + brightness))
        elif op == 1 and contrast > 0:
            img = ImageEnhance.Contrast(img).enhance(_uniform(g, max(0.0, 1 - contrast), 1 + contrast))
        elif op == 2 and saturation > 0:
            img = ImageEnhance.Color(img).enhance(_uniform(g, max(0.0, 1 - saturation), 1 + saturation))
        elif op == 3 and hue > 0:
            img = adjust_hue(img, _uniform(g, -hue, hue))
    return img


def grayscale(img):
    """Luma as three equal channels."""
    return img.convert("L").convert("RGB")


def gaussian_blur(img, g, sigma=BLUR_SIGMA):
    """Gaussian blur with a standard deviation (pixels) drawn uniformly from `sigma`."""
    return img.filter(ImageFilter.GaussianBlur(radius=_uniform(g, *sigma)))


def solarize(img, threshold=SOLARIZE_THRESHOLD):
    """Invert every pixel value >= threshold."""
    return ImageOps.solarize(img, threshold)


# -----------------------------------------------------------------------------
# 2. DINOv2 multi-crop, iBOT block masks and the batch collate (Method §1.2, §5).


def local_crop_size(cfg):
    """data.local_crop_size, or when 0: patch * round(grid * 7/16) with grid = image_size / patch (256/16 -> 112)."""
    if cfg.data.local_crop_size > 0:
        return cfg.data.local_crop_size
    p = cfg.encoder.patch_size
    grid = cfg.encoder.image_size // p
    return p * max(1, int(grid * 7 / 16 + 0.5))  # round half up


def _augment(img, g, blur_p, solarize_p, blur_sigma, jitter, grayscale_p):
    """DINOv2's photometric chain: flip, colour jitter, grayscale, blur, solarize, each with its probability."""
    if _rand(g) < FLIP_P:
        img = hflip(img)
    if _rand(g) < COLOR_JITTER_P:
        img = color_jitter(img, g, *jitter)
    if _rand(g) < grayscale_p:
        img = grayscale(img)
    if _rand(g) < blur_p:
        img = gaussian_blur(img, g, blur_sigma)
    if _rand(g) < solarize_p:
        img = solarize(img)
    return img


def multicrop(img, g, global_size, local_size, num_local, global_scale=(0.32, 1.0), local_scale=(0.05, 0.32),
              blur_sigma=BLUR_SIGMA, jitter=COLOR_JITTER, grayscale_p=GRAYSCALE_P):
    """
    DINOv2 multi-crop of one image (Method §5): [global 1, global 2, local 1, ..., local n] as PIL images.
    Global 1 is always blurred; global 2 is blurred with p 0.1 and solarized with p 0.2; locals blurred with p 0.5.
    jitter: (brightness, contrast, saturation, hue) strengths of the colour jitter; grayscale_p: its probability.
    """
    aug = dict(blur_sigma=blur_sigma, jitter=jitter, grayscale_p=grayscale_p)
    crops = [_augment(random_resized_crop(img, global_size, g, global_scale), g, BLUR_P[0], 0.0, **aug),
             _augment(random_resized_crop(img, global_size, g, global_scale), g, BLUR_P[1], SOLARIZE_P, **aug)]
    for _ in range(num_local):
        crops.append(_augment(random_resized_crop(img, local_size, g, local_scale), g, BLUR_P[2], 0.0, **aug))
    return crops


def block_mask(grid, num_masked, max_masked, min_patches, aspect, g):
    """
    One BEiT-style block mask (grid, grid) bool: add random rectangles of >= min_patches patches with aspect
    ratio in `aspect` (log-uniform) until at least num_masked patches are masked, never more than max_masked.
    """
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < num_masked:
        budget = min(max(num_masked - count, min_patches), max_masked - count)  # new patches this block may add
        added = 0
        for _ in range(MASK_ATTEMPTS):
            area = _uniform(g, min_patches, max(min_patches, budget))
            ratio = math.exp(_uniform(g, *log_aspect))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if h * w < min_patches or h > grid or w > grid:
                continue
            top, left = _randint(g, 0, grid - h), _randint(g, 0, grid - w)
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= budget:
                mask[top:top + h, left:left + w] = True
                added = new
                break
        if added == 0:
            break  # no room for another block (rare): keep what we have
        count += added
    return torch.from_numpy(mask)


def mask_capacity(n, N, mask_prob, mask_ratio):
    """(crops that make_masks masks, most patches it masks in one crop) for n crops of N patches."""
    return int(n * mask_prob), int(mask_ratio[1] * N)


def make_masks(n, grid, mask_prob, mask_ratio, min_patches, aspect, g):
    """
    iBOT masks for n global crops -> (n, grid*grid) bool, row-major patches. int(n * mask_prob) random rows get a
    block mask; their target ratios are spread linearly over `mask_ratio` (one per equal-width bin), the rest none.
    """
    N = grid * grid
    masks = torch.zeros(n, N, dtype=torch.bool)
    n_masked, cap = mask_capacity(n, N, mask_prob, mask_ratio)
    edges = torch.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1).tolist()
    for k, row in enumerate(torch.randperm(n, generator=g)[:n_masked].tolist()):
        target = min(math.ceil(_uniform(g, edges[k], edges[k + 1]) * N), cap)
        masks[row] = block_mask(grid, target, cap, min_patches, aspect, g).flatten()
    return masks


def padded_mask_indices(masks, size):
    """
    The masked patches of iBOT masks (n, N) bool as a static-shape list, as DINOv2 pads it: mask_indices (size,)
    int64 = the flat indices of the True entries of masks.flatten() (image-major, then patch), then 0s; mask_weight
    (size,) float32 = 1 / (masked patches of the entry's crop), 0 for padding, so every masked crop weighs 1 in total.
    """
    flat = masks.flatten().nonzero().flatten()  # (M,)
    if len(flat) > size:
        raise ValueError(f"{len(flat)} masked patches do not fit the {size} slots of mask_indices")
    counts = masks.sum(1)  # (n,) masked patches per crop
    mask_indices = torch.zeros(size, dtype=torch.long)
    mask_weight = torch.zeros(size, dtype=torch.float32)
    mask_indices[: len(flat)] = flat
    mask_weight[: len(flat)] = 1.0 / counts[flat // masks.shape[1]].float()
    return mask_indices, mask_weight


class BatchMaker:
    """
    Turns B samples into one pre-training batch (Method §1.2 batch trick and §5). Picklable, runs in loader workers.
    Randomness: sample i's crops from `torch.Generator(sample_seeds[i])`, subsets and masks from `batch_seed`.
    Images leave the worker as uint8 in [0, 255], a quarter of float32's bytes in shared memory and in the copy to
    the GPU; `batch_to_device` moves the batch and ImageNet-normalizes them there. The batch dict (S =
    encoder.image_size, s = local crop size, p = patch size, N = (S/p)^2):
      images       (B, 3, S, S) uint8 ADM centre crops for CLIP (no flip: captions say left/right)
      tokens       (B, context_length) int64; captions: list of B str; labels (B,) int64 if the data is labelled
      ssl_index    (B_ssl,) int64, sorted random subset for SSL; rec_index (B_rec,) the same for reconstruction
      global_crops (2*B_ssl, 3, S, S) uint8, crop-major: crop 0 of every SSL image, then crop 1
      local_crops  (n_local*B_ssl, 3, s, s) uint8, crop-major, or (0, 3, s, s)
      masks        (2*B_ssl, N) bool iBOT masks aligned with global_crops
      mask_indices (M_max,) int64 flat indices into masks.flatten() of its True entries (image-major, then patch),
                   then padding 0s. M_max = int(2*B_ssl*mask_prob) * int(mask_ratio[1]*N), the most make_masks can
                   mask, so the shape is the same every batch and a compiled step never sees a new one
      mask_weight  (M_max,) float32: 1 / (masked patches of that entry's crop), 0 for padding; sums to the number
                   of masked crops
    batch_to_device adds rec_images (B_rec, 3, S, S) = images[rec_index], gathered on the device.
    """

    def __init__(self, cfg, tokenizer):
        self.data, self.tokenizer = cfg.data, tokenizer
        self.image_size, self.patch_size = cfg.encoder.image_size, cfg.encoder.patch_size
        self.local_size = local_crop_size(cfg)
        self.blur_sigma = tuple(s * min(1.0, self.image_size / BLUR_REF_SIZE) for s in BLUR_SIGMA)
        n_crops, N = 2 * cfg.data.ssl_batch_size, (self.image_size // self.patch_size) ** 2
        n_masked, cap = mask_capacity(n_crops, N, cfg.data.mask_prob, cfg.data.mask_ratio)
        self.max_masked = n_masked * cap  # M_max

    def __call__(self, samples, sample_seeds, batch_seed):
        d, B, S = self.data, len(samples), self.image_size
        g = _generator(batch_seed)
        ssl_index = torch.randperm(B, generator=g)[: d.ssl_batch_size].sort().values
        rec_index = torch.randperm(B, generator=g)[: d.rec_batch_size].sort().values
        images = _stack_uint8([adm_center_crop(s["image"], S) for s in samples])  # (B, 3, S, S)
        views = [[] for _ in range(2 + d.num_local_crops)]  # views[c][i]: crop c of SSL image i
        for i in ssl_index.tolist():
            crops = multicrop(samples[i]["image"], _generator(sample_seeds[i]), S, self.local_size, d.num_local_crops,
                              d.global_crop_scale, d.local_crop_scale, self.blur_sigma, d.color_jitter, d.grayscale_p)
            for c, crop in enumerate(crops):
                views[c].append(crop)
        global_crops = _stack_uint8(views[0] + views[1])  # (2*B_ssl, 3, S, S), crop-major
        local_crops = torch.empty(0, 3, self.local_size, self.local_size, dtype=torch.uint8)  # no local crops
        if d.num_local_crops:
            local_crops = _stack_uint8([x for v in views[2:] for x in v])  # (n_local*B_ssl, 3, s, s), crop-major
        masks = make_masks(len(global_crops), S // self.patch_size, d.mask_prob, d.mask_ratio, d.mask_min_patches,
                           d.mask_aspect, g)  # (2*B_ssl, N)
        mask_indices, mask_weight = padded_mask_indices(masks, self.max_masked)  # (M_max,), (M_max,)
        captions = [s["caption"] for s in samples]
        batch = {"images": images, "tokens": self.tokenizer(captions), "captions": captions,
                 "global_crops": global_crops, "local_crops": local_crops, "masks": masks,
                 "mask_indices": mask_indices, "mask_weight": mask_weight, "ssl_index": ssl_index,
                 "rec_index": rec_index}
        if "label" in samples[0]:
            batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return batch


IMAGE_KEYS = ("images", "global_crops", "local_crops", "rec_images")  # uint8 in a loader batch, float on the device


def batch_to_device(batch, device):
    """
    A pre-training batch (BatchMaker) ready for the step on `device`, as a new dict: every tensor copied with
    non_blocking=True (the loader pins its memory on CUDA), the uint8 IMAGE_KEYS ImageNet-normalized to float32
    there, and rec_images (B_rec, 3, S, S) = images[rec_index] gathered there when the batch has none, so the
    reconstruction subset is not copied twice. Float images (a synthetic batch) and captions pass through as they are.
    """
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    for key in IMAGE_KEYS:
        if key in out and out[key].dtype == torch.uint8:
            out[key] = normalize_uint8(out[key])  # (N, 3, H, W) float32
    if "rec_images" not in out and "rec_index" in out:
        out["rec_images"] = out["images"].index_select(0, out["rec_index"])  # (B_rec, 3, S, S); never syncs
    return out


# -----------------------------------------------------------------------------
# 3. Loaders. The pre-training stream is made of whole batches, each built in one worker; the main process keeps
# the position of the last batch it handed out, so a checkpoint stores exactly where the next batch starts.


def _identity(x):
    return x


def _worker():
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class _MapBatches(torch.utils.data.IterableDataset):
    """
    Batches of a map-style data set. Epoch e visits a permutation of the data drawn from (seed, e); batch n of
    rank r holds stream positions (n*B + j)*world_size + r, j < B. Batch t = e*batches_per_epoch + n is a pure
    function of (seed, t), so worker w of nw just builds t = t0 + w, t0 + w + nw, ... and the DataLoader's
    round-robin returns them in order: the stream is the same for any num_workers, and t is the whole position.
    """

    def __init__(self, dataset, maker, batch_size, seed, rank, world_size):
        self.dataset, self.maker, self.B, self.seed = dataset, maker, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the data set has {len(dataset)} samples, fewer than one global batch "
                             f"(data.batch_size={batch_size} x world_size={world_size})")
        self.t, self._order = 0, (None, None)

    def __iter__(self):
        w, nw = _worker()
        for t in itertools.count(self.t + w, nw):
            yield self.batch(t)

    def batch(self, t):
        epoch, n = divmod(t, self.batches_per_epoch)
        if self._order[0] != epoch:  # one permutation per epoch, cached
            g = _generator(_seed("epoch", self.seed, epoch))
            self._order = (epoch, torch.randperm(len(self.dataset), generator=g))
        samples, seeds = [], []
        for j in range(self.B):
            p = (n * self.B + j) * self.world_size + self.rank
            samples.append(self._load(int(self._order[1][p]), epoch, p))
            seeds.append(_seed("sample", self.seed, epoch, p))
        batch = self.maker(samples, seeds, _seed("batch", self.seed, epoch, n, self.rank))
        batch["_position"] = t
        return batch

    def _load(self, i, epoch, p):
        """dataset[i], or a deterministic random replacement when it is unreadable."""
        for attempt in range(MAX_SAMPLE_RETRIES):
            try:
                return self.dataset[i]
            except UnreadableSample as e:
                self.dataset.skips(f"sample {i}", e)
            g = _generator(_seed("retry", self.seed, epoch, p, attempt))
            i = int(torch.randint(len(self.dataset), (1,), generator=g))
        raise RuntimeError(f"{MAX_SAMPLE_RETRIES} unreadable samples in a row: is the data set corrupt?")

    def advance(self, position):
        self.t = position + 1

    def state_dict(self):
        epoch, n = divmod(self.t, self.batches_per_epoch)
        return {"epoch": epoch, "offset": n * self.B * self.world_size}  # offset: samples of the epoch consumed

    def load_state_dict(self, state):
        """A state or the list of every rank's (all equal: each rank consumes as many batches); exact on any
        world size, the position being global."""
        state = state[0] if isinstance(state, list) else state
        self.t = state["epoch"] * self.batches_per_epoch + state["offset"] // (self.B * self.world_size)


class _TarBatches(torch.utils.data.IterableDataset):
    """
    Batches of tar shards. Each loader worker is one reader (max(1, num_workers) per rank) that streams its own
    shard groups (TarShards.reader_groups) through its shuffle buffer (TarShards.stream) and emits whole batches;
    the DataLoader returns the workers' batches round-robin. A reader's position is [epoch, group, items of the
    group emitted] after the last consumed batch; with the number of batches consumed it is this rank's state.
    Resuming on the same layout (world size, readers per rank, shuffle settings) is exact; on another one the epoch
    goes on without the shards that every old reader had finished (`_resume_on_new_layout`).
    """

    def __init__(self, shards, maker, batch_size, seed, rank, world_size, num_workers, shuffle_shards=1,
                 shuffle_buffer=0):
        self.shards, self.maker, self.B, self.seed = shards, maker, batch_size, seed
        self.rank, self.world_size, self.num_readers = rank, world_size, max(1, num_workers)
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        if len(shards.urls) < world_size * self.num_readers:
            raise ConfigError(f"data.path has {len(shards.urls)} tar shards but {world_size} process(es) x "
                              f"{self.num_readers} reader(s) (data.num_workers={num_workers}) = "
                              f"{world_size * self.num_readers} readers need at least one shard each: lower "
                              "data.num_workers or write more shards")
        self.consumed, self.positions = 0, [[0, 0, 0] for _ in range(self.num_readers)]
        self.partial = None  # [epoch, shards]: an epoch resumed on another layout reads only these shards

    def groups(self, epoch, reader):
        """The shard groups of this rank's reader `reader` in `epoch`."""
        only = self.partial[1] if self.partial and self.partial[0] == epoch else None
        return self.shards.reader_groups(epoch, self.seed, self.rank, self.world_size, reader, self.num_readers,
                                         self.shuffle_shards, only)

    def __iter__(self):
        w, _ = _worker()
        r = (w + self.consumed) % self.num_readers  # the reader whose batch comes next goes first
        epoch, *start = self.positions[r]
        samples, seeds, first = [], [], None
        while True:
            groups, got = self.groups(epoch, r), 0
            for (group, n), shard, k, sample in self.shards.stream(epoch, groups, self.seed, self.shuffle_buffer,
                                                                    start):
                if sample is None:
                    continue
                got += 1
                samples.append(sample)
                seeds.append(_seed("sample", self.seed, epoch, shard, k))
                first = first or (epoch, shard, k)
                if len(samples) == self.B:
                    batch = self.maker(samples, seeds, _seed("batch", self.seed, *first))
                    batch["_position"] = (r, epoch, group, n) if group < len(groups) else (r, epoch + 1, 0, 0)
                    yield batch
                    samples, seeds, first = [], [], None
            if got == 0 and start == [0, 0] and not (self.partial and self.partial[0] == epoch):
                raise RuntimeError(f"tar reader {r} of rank {self.rank}: a whole epoch of {len(groups)} shard groups "
                                   "without a usable sample (are its shards empty?)")
            epoch, start = epoch + 1, [0, 0]

    def advance(self, position):
        r, *pos = position
        self.positions[r] = list(pos)
        self.consumed += 1

    def state_dict(self):
        epoch = min(p[0] for p in self.positions)
        return {"epoch": epoch, "batches": self.consumed, "rank": self.rank, "world_size": self.world_size,
                "readers": [list(p) for p in self.positions], "num_shards": len(self.shards.urls),
                "shuffle_shards": self.shuffle_shards, "shuffle_buffer": self.shuffle_buffer,
                "partial": self.partial if self.partial and self.partial[0] >= epoch else None}

    def _same_layout(self, state):
        return (state["world_size"], len(state["readers"]), state["num_shards"], state["shuffle_shards"],
                state["shuffle_buffer"]) == (self.world_size, self.num_readers, len(self.shards.urls),
                                             self.shuffle_shards, self.shuffle_buffer)

    def load_state_dict(self, state):
        """One rank's state, or the list of every rank's: exact on the same layout (this rank's entry), else the
        list continues its epoch on this layout (`_resume_on_new_layout`), and anything less restarts the epoch."""
        states = state if isinstance(state, list) else [state]
        mine = [s for s in states if "readers" in s and s["rank"] == self.rank and self._same_layout(s)]
        complete = (all("readers" in s for s in states) and sorted(s["rank"] for s in states) ==
                    list(range(states[0]["world_size"])) and states[0]["num_shards"] == len(self.shards.urls))
        if mine:
            self.consumed, self.positions = mine[0]["batches"], [list(p) for p in mine[0]["readers"]]
            self.partial = copy.deepcopy(mine[0]["partial"])
        elif complete:
            self._resume_on_new_layout(states)
        else:
            epoch = min(s["epoch"] for s in states)
            print(f"data[tar]: the saved position is not every rank's, or from other data or an older version; "
                  f"restarting epoch {epoch} from its start", file=sys.stderr, flush=True)
            self.consumed, self.positions, self.partial = 0, [[epoch, 0, 0] for _ in range(self.num_readers)], None

    def _resume_on_new_layout(self, states):
        """
        Continue the earliest unfinished epoch E of a run saved on another layout (`states`: every old rank's) with
        the shards no old reader had finished: those of each old reader still in E from its current group on (a
        partly read group is read again in full). A reader already past E had finished all of its E shards; what
        it read of E + 1 is read again in E + 1.
        """
        epoch = min(p[0] for s in states for p in s["readers"])
        old = next((s["partial"][1] for s in states if s["partial"] and s["partial"][0] == epoch), None)
        pending, partly = set(), 0
        for s in states:
            for reader, (e, group, n) in enumerate(s["readers"]):
                if e == epoch:
                    groups = self.shards.reader_groups(epoch, self.seed, s["rank"], s["world_size"], reader,
                                                       len(s["readers"]), s["shuffle_shards"], old)
                    pending.update(shard for g in groups[group:] for shard in g)
                    partly += n > 0
        self.consumed, self.partial = 0, [epoch, sorted(pending)]
        self.positions = [[epoch, 0, 0] for _ in range(self.num_readers)]
        if self.rank == 0:
            s = states[0]
            print(f"data[tar]: the saved position is from {s['world_size']} process(es) x {len(s['readers'])} "
                  f"reader(s), this run has {self.world_size} x {self.num_readers}: epoch {epoch} goes on with the "
                  f"{len(pending)} of its {len(old or self.shards.urls)} shards not fully read ({partly} partly read "
                  "shard group(s) are read again in full)", file=sys.stderr, flush=True)


class PretrainLoader:
    """
    Infinite iterator of pre-training batches (see BatchMaker; `batch_to_device` moves one to the GPU) with a
    resumable position: `state_dict()` after any number of `next()` calls is this rank's small picklable state;
    `load_state_dict()` on a new loader (before or during iteration), given that state or the list of every rank's
    states, continues with the next unseen batch. On another world size or data.num_workers, map-style data still
    continues exactly; tar shards continue their epoch without the shards already read (_TarBatches).
    """

    def __init__(self, stream, num_workers):
        self.stream, self.num_workers, self._iter = stream, num_workers, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iter is None:  # workers start here, with a copy of the stream at its current position
            loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                                 collate_fn=_identity, pin_memory=torch.cuda.is_available())
            self._iter = iter(loader)
        batch = next(self._iter)
        self.stream.advance(batch.pop("_position"))
        return batch

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)
        self._iter = None  # restart the workers at the loaded position


def build_dataset(cfg, split, image_size=None):
    """
    The data set of `split` ("train" | "val" | "all" = train without any held-back slice): builtin scenes (drawn
    at `image_size`, default encoder.image_size), or a reader of data.path (train, all) / data.val_path (val;
    without it a held-back slice of data.path, see `held_out`). Map-style readers give samples {"image": PIL RGB,
    "caption": str, "label": int (labelled data only)} and have `class_names` (None when unlabelled); tar shards
    are iterable only. Fails here, naming the field, on a missing path or one without a usable sample.
    """
    d = cfg.data
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if d.dataset == "builtin":
        size = d.builtin_val_size if split == "val" else d.builtin_train_size
        return BuiltinScenes("val" if split == "val" else "train", image_size or cfg.encoder.image_size, size, d.seed)
    # no validation data: a fixed slice of the training data is held back ("all": every sample of data.path)
    hold = not d.val_path and d.holdout > 0 and split != "all"
    key = "data.val_path" if split == "val" and not hold else "data.path"
    dataset = READERS[d.dataset](d.val_path if key == "data.val_path" else d.path, key)
    if hold:
        dataset = held_out(dataset, d.holdout, split)
    _check_usable(dataset, key)
    return dataset


def held_out(dataset, n, split):
    """
    Split a reader of data.path into training and validation views when there is no data.val_path: validation =
    n evenly spaced images (at most a tenth, with all their captions) of a map-style reader, or the first n samples
    of the first tar shard (sorted order); training never sees them. Returns the view of `split`; the training view
    says so in the log.
    """
    view = copy.copy(dataset)
    if isinstance(dataset, TarShards):
        view.holdout, view.role = n, split
        if split == "val":
            view.urls = dataset.urls[:1]
        what = f"the first {n} samples of {dataset.urls[0]}"
    else:  # n evenly spaced distinct images (all classes of a class folder; every caption of a held-back image)
        paths = list(dict.fromkeys(path for path, _ in dataset.items))
        n = max(1, min(n, len(paths) // 10))
        chosen = set(paths[len(paths) // n - 1::len(paths) // n][:n])
        view.items = [item for item in dataset.items if (item[0] in chosen) == (split == "val")]
        what = f"{n} evenly spaced of {len(paths)} images"
    if split == "train":
        _print_once(f"data: no data.val_path: {what} are held back for validation and previews (not trained on)")
    return view


_PRINTED = set()  # messages `_print_once` has printed in this process


def _print_once(message):
    """Print to stderr unless this process printed the same message before (build_dataset runs several times)."""
    if message not in _PRINTED:
        _PRINTED.add(message)
        print(message, file=sys.stderr, flush=True)


def build_tokenizer(cfg):
    """
    The text tokenizer of cfg.text: tokenizer == "bpe" trains a byte-level BPE of text.vocab_size on the first
    training captions (deterministic, so every rank gets the same one); otherwise text.tokenizer is the path of
    CLIP's merges file, and text.vocab_size must equal its vocabulary (49408).
    """
    t = cfg.text
    if t.tokenizer == "bpe":
        if t.vocab_size < 258:
            raise ConfigError(f"invalid config value text.vocab_size={t.vocab_size}: a byte-level BPE needs >= 258 "
                              "(256 bytes + start + end)")
        dataset = build_dataset(cfg, "train")
        n = BUILTIN_BPE_CAPTIONS if cfg.data.dataset == "builtin" else BPE_TRAIN_CAPTIONS
        captions = dataset.captions(n) if isinstance(dataset, TarShards) else _map_captions(dataset, n)
        return BPETokenizer(t.vocab_size, t.context_length).train(captions)
    if not os.path.isfile(t.tokenizer):
        raise ConfigError(f"invalid config value text.tokenizer={t.tokenizer!r}: expected 'bpe' or the path of CLIP's "
                          "merges file bpe_simple_vocab_16e6.txt.gz (no such file)")
    tokenizer = BPETokenizer.from_clip_merges(t.tokenizer, t.context_length)
    if tokenizer.vocab_size != t.vocab_size:
        raise ConfigError(f"invalid config value text.vocab_size={t.vocab_size}: the merges file {t.tokenizer} has a "
                          f"vocabulary of {tokenizer.vocab_size}; set --text.vocab_size={tokenizer.vocab_size}")
    return tokenizer


def _map_captions(dataset, n):
    out = []
    for i in range(min(n, len(dataset))):
        try:
            out.append(dataset.caption(i))
        except UnreadableSample:
            pass
    return out


def build_pretrain_loader(cfg, tokenizer, rank=0, world_size=1):
    """
    The infinite, resumable stream of pre-training batches of this rank (per-process batch = data.batch_size;
    keys in BatchMaker), with data.num_workers worker processes. Pass `loader.state_dict()` of every rank to
    checkpoints and `loader.load_state_dict(states)` on resume. Tar shards: each of the world_size x
    max(1, data.num_workers) readers needs a shard of its own (a ConfigError here otherwise), and data.shuffle_shards /
    data.shuffle_buffer set each reader's shuffle (TarShards.shuffled).
    """
    d = cfg.data
    dataset = build_dataset(cfg, "train")
    maker = BatchMaker(cfg, tokenizer)
    if isinstance(dataset, TarShards):
        stream = _TarBatches(dataset, maker, d.batch_size, d.seed, rank, world_size, d.num_workers, d.shuffle_shards,
                             d.shuffle_buffer)
    else:
        stream = _MapBatches(dataset, maker, d.batch_size, d.seed, rank, world_size)
    return PretrainLoader(stream, d.num_workers)


def _eval_batch(samples, indices, image_size, squash=False):
    """Samples -> {"images": (b, 3, S, S) normalized ADM centre crops (or squashed: `resize`), "captions", "index",
    ["labels"]}."""
    fit = resize if squash else adm_center_crop
    images = _stack_normalized([fit(s["image"], image_size) for s in samples])  # (b, 3, S, S)
    batch = {"images": images, "captions": [s["caption"] for s in samples],
             "index": torch.tensor(indices, dtype=torch.long)}
    if "label" in samples[0]:
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


class _EvalChunks(torch.utils.data.Dataset):
    """Chunk c = one evaluation batch of a map-style data set; unreadable samples are skipped (None if all are)."""

    def __init__(self, dataset, chunks, image_size, squash=False):
        self.dataset, self.chunks, self.image_size, self.squash = dataset, chunks, image_size, squash

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, c):
        samples, indices = [], []
        for i in self.chunks[c]:
            try:
                samples.append(self.dataset[i])
                indices.append(i)
            except UnreadableSample as e:
                self.dataset.skips(f"sample {i}", e)
        return _eval_batch(samples, indices, self.image_size, self.squash) if samples else None


class EvalLoader:
    """
    Deterministic evaluation batches of one rank: the first max_images samples (all if None), rank r taking
    indices r, r + world_size, ...; `index` gives each sample's global index so ranks can be merged.
    """

    def __init__(self, dataset, image_size, batch_size, rank, world_size, max_images, num_workers, squash=False):
        self.dataset, self.image_size, self.batch_size, self.squash = dataset, image_size, batch_size, squash
        self.rank, self.world_size, self.max_images, self.num_workers = rank, world_size, max_images, num_workers
        if not isinstance(dataset, TarShards):
            n = len(dataset) if max_images is None else min(len(dataset), max_images)
            mine = list(range(rank, n, world_size))
            self.chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]

    def __len__(self):
        if isinstance(self.dataset, TarShards):
            raise TypeError("the length of a tar-shard evaluation stream is unknown before reading it")
        return len(self.chunks)

    def __iter__(self):
        if isinstance(self.dataset, TarShards):
            yield from self._tar_batches()
            return
        chunks = _EvalChunks(self.dataset, self.chunks, self.image_size, self.squash)
        loader = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_identity, pin_memory=torch.cuda.is_available())
        yield from (b for b in loader if b is not None)

    def _tar_batches(self):
        samples, indices, index = [], [], 0
        for shard in range(len(self.dataset.urls)):
            for _, key, files in self.dataset.read_shard(shard):
                if self.max_images is not None and index >= self.max_images:
                    break
                if index % self.world_size == self.rank:
                    try:
                        samples.append(_decode_tar_sample(files))
                        indices.append(index)
                    except UnreadableSample as e:
                        self.dataset.skips(f"{self.dataset.urls[shard]}:{key}", e)
                index += 1
                if len(samples) == self.batch_size:
                    yield _eval_batch(samples, indices, self.image_size, self.squash)
                    samples, indices = [], []
        if samples:
            yield _eval_batch(samples, indices, self.image_size, self.squash)


def build_eval_loader(cfg, split, image_size, batch_size, rank=0, world_size=1, max_images=None, squash=False):
    """
    Evaluation / latent-caching batches of `split` at `image_size`: {"images": (b, 3, S, S) ImageNet-normalized
    ADM centre crops, "labels": (b,) int64 (labelled data), "captions": list, "index": (b,) int64 global indices}.
    Rank r gets indices r::world_size of the first max_images samples, in a fixed order; data.num_workers workers.
    squash=True resizes to S x S without cropping (the zero-shot protocol) instead of the ADM centre crop.
    """
    dataset = build_dataset(cfg, split, image_size)
    return EvalLoader(dataset, image_size, batch_size, rank, world_size, max_images, cfg.data.num_workers, squash)


# -----------------------------------------------------------------------------
# 4. Text tokenizer: byte-level BPE, trained from scratch or loaded from CLIP's merges file.

# Pre-tokenization with the stdlib `re` (no \p{..} classes): [^\W\d_] = letters, \d = digits,
# (?:[^\s\w]|_) = everything else that is not whitespace. ASCII behaves exactly like the \p{L}/\p{N} originals.
_BYTE_SPLIT = re.compile(r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")  # GPT-2 style
_CLIP_SPLIT = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""",
                         re.IGNORECASE)
_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
CLIP_NUM_MERGES = 49408 - 256 - 256 - 2  # CLIP uses the first 48894 merges of bpe_simple_vocab_16e6.txt.gz

# CLIP's byte order (its bytes_to_unicode): printable bytes first, keeping their own character, then the other 68
# bytes, which get the characters chr(256 + n). A byte's token id is its rank in this order (+256 at a word end).
_PRINTABLE = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
CLIP_BYTE_ORDER = _PRINTABLE + [b for b in range(256) if b not in _PRINTABLE]
_CLIP_CHARS = [chr(b) if r < len(_PRINTABLE) else chr(256 + r - len(_PRINTABLE)) for r, b in enumerate(CLIP_BYTE_ORDER)]
_CLIP_RANK = {b: r for r, b in enumerate(CLIP_BYTE_ORDER)}  # byte -> its CLIP token id


def _merge(ids, pair, new_id):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _clip_clean(text):
    """CLIP's text cleanup without ftfy: HTML unescape (twice), collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class BPETokenizer:
    """
    Byte-level BPE (minbpe-style), in one of two kinds with one interface:

      kind="bytes": our own, trained on captions (`train`). Ids 0..255 are the bytes, 256.. the merges in order.
        Case and whitespace are kept, so decode(encode(s)) == s for any string.
      kind="clip": OpenAI CLIP's vocabulary (`from_clip_merges`). Ids 0..255 are bytes inside a word and 256..511
        the same bytes ending a word (CLIP's `</w>`), 512.. the merges; text is cleaned and lower-cased first, and
        decode puts a space after every word.

    In both, start = vocab_size - 2 and end = vocab_size - 1: the end token has the largest id, because the text
    tower pools at the argmax token id (Method §4). `tokenizer(texts)` gives (B, context_length) int64 rows
    [start, ids..., end, 0, 0, ...], truncated so the end token is always kept. Picklable (loader workers) and
    saved in checkpoints through `state_dict()` / `tokenizer_from_state()`.
    """

    def __init__(self, vocab_size=1024, context_length=32, merges=(), kind="bytes"):
        if kind not in ("bytes", "clip"):
            raise ValueError(f"tokenizer kind must be 'bytes' or 'clip', got {kind!r}")
        self.kind, self.vocab_size, self.context_length = kind, vocab_size, context_length
        self.sot_id, self.eot_id = vocab_size - 2, vocab_size - 1
        self.base = 256 if kind == "bytes" else 512  # id of the first merge
        if vocab_size < self.base + 2 + len(merges) or context_length < 2:
            raise ValueError(f"vocab_size={vocab_size} is too small for {len(merges)} merges of a '{kind}' BPE "
                             f"(needs >= {self.base + 2 + len(merges)}), or context_length={context_length} < 2")
        self._set_merges([tuple(p) for p in merges])

    def _set_merges(self, merges):
        self.merges = merges
        self.ranks = {pair: self.base + i for i, pair in enumerate(merges)}  # pair -> new id; lower id merges first
        if self.kind == "bytes":
            self.vocab = {i: bytes([i]) for i in range(256)}
        else:
            self.vocab = {r: bytes([b]) for r, b in enumerate(CLIP_BYTE_ORDER)}
            self.vocab.update({256 + r: bytes([b]) + b" " for r, b in enumerate(CLIP_BYTE_ORDER)})  # `</w>` = space
        for (a, b), idx in self.ranks.items():
            self.vocab[idx] = self.vocab[a] + self.vocab[b]
        self._cache = {}  # pre-token -> ids

    # --- training (kind="bytes") ---

    def train(self, texts):
        """
        Learn vocab_size - 258 merges from `texts` (minbpe's algorithm on pre-tokenized chunks, counted once per
        distinct chunk; pair counts are updated incrementally so a few thousand captions take about a second).
        Deterministic: every rank that trains on the same captions gets the same tokenizer.
        """
        assert self.kind == "bytes", "only the byte-level kind is trained; CLIP's merges are loaded"
        chunks = Counter(c for t in texts for c in _BYTE_SPLIT.findall(t))
        words = [list(c.encode("utf-8")) for c in chunks]
        freqs = list(chunks.values())
        stats, where = Counter(), defaultdict(set)  # pair -> weighted count, pair -> indices of words holding it
        for w, ids in enumerate(words):
            for pair in zip(ids, ids[1:]):
                stats[pair] += freqs[w]
                where[pair].add(w)
        merges = []
        for new_id in range(256, self.vocab_size - 2):
            if not stats:
                break  # every chunk is a single token already
            pair = max(stats, key=stats.get)  # ties: the first inserted, deterministic
            merges.append(pair)
            for w in sorted(where.pop(pair)):
                old = words[w]
                for p in zip(old, old[1:]):
                    stats[p] -= freqs[w]
                    if stats[p] == 0:
                        del stats[p]
                words[w] = _merge(old, pair, new_id)
                for p in zip(words[w], words[w][1:]):
                    stats[p] += freqs[w]
                    where[p].add(w)
            stats.pop(pair, None)
        self._set_merges(merges)
        return self

    # --- CLIP vocabulary ---

    @classmethod
    def from_clip_merges(cls, path, context_length=77):
        """Load CLIP's `bpe_simple_vocab_16e6.txt.gz` (or any file in its format: a header line, then `a b` merges)."""
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:1 + CLIP_NUM_MERGES]  # line 0 is a version header
        ids = {ch: r for r, ch in enumerate(_CLIP_CHARS)}
        ids.update({ch + "</w>": 256 + r for r, ch in enumerate(_CLIP_CHARS)})
        merges = []
        for lineno, line in enumerate(lines, 2):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in ids or parts[1] not in ids:
                raise ValueError(f"{path}:{lineno}: expected a merge 'a b' of known tokens, got {line!r}")
            merges.append((ids[parts[0]], ids[parts[1]]))
            ids[parts[0] + parts[1]] = 512 + len(merges) - 1
        return cls(512 + len(merges) + 2, context_length, merges, kind="clip")

    # --- encoding and decoding ---

    def _pre_tokens(self, text):
        if self.kind == "bytes":
            return _BYTE_SPLIT.findall(text)
        return _CLIP_SPLIT.findall(_clip_clean(text))

    def _bpe(self, chunk):
        """Ids of one pre-token: start from its bytes, apply the lowest-ranked merge until none applies."""
        if self.kind == "clip" and chunk in _CLIP_SPECIAL:
            return [self.sot_id if chunk == _CLIP_SPECIAL[0] else self.eot_id]
        if self.kind == "bytes":
            ids = list(chunk.encode("utf-8"))
        else:
            ids = [_CLIP_RANK[b] for b in chunk.encode("utf-8")]
            ids[-1] += 256  # the last byte of a word carries `</w>`
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, self.ranks[pair])
        return ids

    def encode(self, text):
        """str -> list of token ids (no start / end tokens)."""
        out = []
        for chunk in self._pre_tokens(text):
            ids = self._cache.get(chunk)
            if ids is None:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                ids = self._cache[chunk] = self._bpe(chunk)
            out.extend(ids)
        return out

    def decode(self, ids):
        """list of token ids -> str. Stops at the end token and drops ids without bytes (start token, unused ids),
        so a padded row from __call__ decodes to its text."""
        parts = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            parts.append(self.vocab.get(i, b""))
        return b"".join(parts).decode("utf-8", errors="replace")

    def __call__(self, texts):
        """list[str] (or one str) -> LongTensor (B, context_length): start, ids, end, then zero padding."""
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text)[: self.context_length - 2] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    # --- persistence ---

    def state_dict(self):
        """Plain python types (fits in a `weights_only` torch checkpoint); rebuild with `tokenizer_from_state`."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "context_length": self.context_length,
                "merges": [list(p) for p in self.merges]}


def tokenizer_from_state(state):
    """Rebuild a tokenizer from `BPETokenizer.state_dict()` (e.g. `ckpt["tokenizer"]`)."""
    return BPETokenizer(state["vocab_size"], state["context_length"], state["merges"], state["kind"])


# -----------------------------------------------------------------------------
# 5. Built-in data: procedurally drawn captioned scenes. Scene `index` of a split is a pure function of
# (seed, split, index); drawing works at any size. Label = the main object's shape.

BUILTIN_VERSION = 2  # bumped whenever the drawn scenes change; files derived from them (the judge) carry it
# Shapes that stay distinct at 32 px: a hexagon was the first choice, but at 15 px it is a circle [ours].
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
               "diamond": ("diamond", "rhombus"), "star": ("star", "five-pointed star"),
               "cross": ("cross", "plus sign"),
               "ring": ("ring", "hoop"), "heart": ("heart",)}
COLORS = {"red": (220, 38, 38), "orange": (245, 140, 30), "yellow": (245, 215, 40), "green": (40, 170, 70),
          "cyan": (40, 200, 215), "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (245, 130, 190),
          "brown": (125, 80, 40), "white": (245, 245, 245)}
BACKGROUNDS = {"gray": (128, 128, 128), "black": (25, 25, 25), "white": (235, 235, 235), "beige": (225, 205, 160)}
PATTERNS = {"plain": 0.85, "noisy": 0.05, "striped": 0.05, "checkered": 0.05}  # probabilities; plain has a faint grain
MIN_CONTRAST = 130  # RGB distance an object colour keeps from the background colour
SIZES = {"tiny": (0.18, 0.28), "small": (0.55, 0.65), "medium": (0.65, 0.75), "large": (0.8, 0.95)}  # diameter/side
# The labelled object is large (80-95% of the side) and most backgrounds are plain, so that the tiny ViT can learn
# shape at 32 px within the default budget [ours]: a ViT from scratch is slow to learn scale invariance, and the
# range of sizes mattered most (scripts/results/experiments.md). The smaller sizes stay in SIZES (MAIN_SIZES).
MAIN_SIZES = ("large",)
SIZE_WORDS = {"tiny": ("tiny", "very small"), "small": ("small", "little"), "medium": ("medium", "medium-sized"),
              "large": ("large", "big")}
POSITION_PHRASES = {  # the 3x3 cell of an object's centre, row-major
    "top left": ("in the top left corner", "at the top left"), "top": ("at the top", "near the top edge"),
    "top right": ("in the top right corner", "at the top right"), "left": ("on the left", "at the left side"),
    "centre": ("in the centre", "in the middle", "near the center"), "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom edge"),
    "bottom right": ("in the bottom right corner", "at the bottom right")}
POSITIONS = tuple(POSITION_PHRASES)
SECOND_OBJECT_P = 0.25  # scenes with a tiny second object (drawn beneath the main one, so it never hides it)
# Captions name the main object's shape always and every other attribute only sometimes, as alt-text does [ours].
# A caption that leaves out the colour fits every colour of its shape, so many of its in-batch negatives differ from
# it only in shape: InfoNCE cannot be solved by colour alone. `shape_only_negative_share` measures this on a batch.
MENTION_P = {"size": 0.3, "color": 0.5, "position": 0.3, "background": 0.25, "second": 0.5}
CAPTION_PREFIXES = ("", "", "there is ", "a picture of ", "a drawing of ", "an image of ")
SECOND_OBJECT_JOINS = (" and {o2}", ", with {o2}", " next to {o2}")
RING_INNER, STAR_INNER, DIAMOND_WIDTH, CROSS_ARM = 0.55, 0.45, 0.62, 0.33  # shape proportions (of the radius)
BACKGROUND_NOISE = {"plain": 4.0, "noisy": 28.0, "striped": 4.0, "checkered": 4.0}  # grain std, 0..255 scale
PATTERN_TONE = 45  # brightness step of the second tone of stripes and checks


def _seed(*parts):
    """A 63-bit integer that is a pure function of `parts` (stable across processes and runs, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cell(cx, cy):
    """Name of the 3x3 cell holding the point (cx, cy) in [0, 1]^2."""
    return POSITIONS[3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)]


def _far(a, b):
    return math.dist(a, b) >= MIN_CONTRAST


class BuiltinScenes:
    """
    The default data set: `size` captioned scenes of the `split` ("train" or "val"), drawn at image_size x
    image_size on the fly. A scene is a textured background (plain / noisy / striped / checkered, 4 colours) with a
    main object (8 shapes, 10 colours, 80-95% of the side, near the centre) and sometimes a tiny second object;
    its caption names the main shape always and the other attributes sometimes (`MENTION_P`), with synonyms; the
    names it uses are kept in the scene's "mentions". Train and val scenes are disjoint: the
    split name is part of every scene's seed. Samples: {"image": PIL RGB, "caption": str, "label": shape index}.
    """

    def __init__(self, split="train", image_size=32, size=1_000_000, seed=0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.image_size, self.size, self.seed = split, image_size, size, seed
        self.class_names = list(SHAPES)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"scene {index} out of range [0, {self.size})")
        scene = self.scene(index)
        return {"image": draw_scene(scene, self.image_size), "caption": scene["caption"], "label": scene["label"]}

    def caption(self, index):
        return self.scene(index)["caption"]

    def scene(self, index):
        """The attributes of scene `index` (no drawing): background, objects (main first), caption, label."""
        g = _generator(_seed("builtin", self.seed, self.split, index))
        u = iter(torch.rand(96, generator=g).tolist())
        pick = lambda options: options[min(int(next(u) * len(options)), len(options) - 1)]  # noqa: E731

        def pick_weighted(probs):  # one draw, like pick: the key of `probs` whose cumulative share covers it
            x, total = next(u), 0.0
            for key, p in probs.items():
                total += p
                if x < total:
                    return key
            return key

        def new_object(sizes, colors):
            size = pick(sizes)
            lo, hi = SIZES[size]
            radius = (lo + (hi - lo) * next(u)) / 2
            return {"shape": pick(SHAPES), "color": pick(colors), "size": size, "radius": radius,
                    "angle": (next(u) - 0.5) * math.pi / 6}  # +-15 degrees: a square never turns into a diamond

        def place(obj):
            obj["cx"], obj["cy"] = (obj["radius"] + (1 - 2 * obj["radius"]) * next(u) for _ in range(2))

        main = new_object(MAIN_SIZES, tuple(COLORS))
        place(main)
        background = pick([b for b in BACKGROUNDS if _far(BACKGROUNDS[b], COLORS[main["color"]])])
        objects = [main]
        if next(u) < SECOND_OBJECT_P:
            second = new_object(("tiny",), [c for c in COLORS if _far(COLORS[c], BACKGROUNDS[background])])
            spots = [(r + (1 - 2 * r) * next(u), r + (1 - 2 * r) * next(u)) for r in [second["radius"]] * 4]
            second["cx"], second["cy"] = max(spots, key=lambda s: math.dist(s, (main["cx"], main["cy"])))
            objects.append(second)
        for obj in objects:
            obj["position"] = _cell(obj["cx"], obj["cy"])
        scene = {"index": index, "split": self.split, "seed": _seed("pixels", self.seed, self.split, index),
                 "background": background, "pattern": pick_weighted(PATTERNS), "period": 0.1 + 0.15 * next(u),
                 "stripe_angle": next(u) * math.pi, "objects": objects, "label": SHAPES.index(main["shape"])}
        scene["caption"], scene["mentions"] = self._caption(scene, u, pick)
        return scene

    @staticmethod
    def _caption(scene, u, pick):
        """The caption and the attributes it names (`MENTION_P`): "a red star in the top left corner", "a heart"."""
        said = {k for k, p in MENTION_P.items() if next(u) < p}  # one draw per attribute, always all drawn
        if len(scene["objects"]) == 1:
            said.discard("second")
        main = scene["objects"][0]
        words = [pick(SIZE_WORDS[main["size"]])] if "size" in said else []
        words += [main["color"]] if "color" in said else []
        text = pick(CAPTION_PREFIXES) + _with_article(" ".join(words + [pick(SHAPE_WORDS[main["shape"]])]))
        if "position" in said:
            text += " " + pick(POSITION_PHRASES[main["position"]])
        if "second" in said:
            second = scene["objects"][1]
            words2 = [pick(SIZE_WORDS[second["size"]]), second["color"], pick(SHAPE_WORDS[second["shape"]])]
            o2 = _with_article(" ".join(words2))
            text += pick(SECOND_OBJECT_JOINS).format(o2=o2)
        if "background" in said:
            pattern = "" if scene["pattern"] == "plain" else scene["pattern"] + " "
            text += " on " + _with_article(f"{pattern}{scene['background']} background")
        return text, sorted(said)


def caption_fits(scene, other):
    """
    Whether `scene`'s caption describes `other` in everything but the main object's shape: the same value for each
    attribute the caption names (main object's size, colour, position; background and pattern; the second object's
    size, colour and shape). With a different main shape, `other` is then a shape-only negative for that caption.
    """
    a, b = scene["objects"][0], other["objects"][0]
    said = scene["mentions"]
    if any(k in said and a[k] != b[k] for k in ("size", "color", "position")):
        return False
    if "background" in said and (scene["background"], scene["pattern"]) != (other["background"], other["pattern"]):
        return False
    if "second" in said:
        if len(other["objects"]) < 2:
            return False
        s, t = scene["objects"][1], other["objects"][1]
        return all(s[k] == t[k] for k in ("size", "color", "shape"))
    return True


def shape_only_negative_share(scenes):
    """
    Share of the ordered pairs (i, j != i) of a batch of `BuiltinScenes.scene()` dicts in which j's main shape
    differs from i's and i's caption fits j otherwise (`caption_fits`): the negatives CLIP can only reject by shape.
    """
    n = len(scenes)
    hard = sum(a["label"] != b["label"] and caption_fits(a, b)
               for i, a in enumerate(scenes) for j, b in enumerate(scenes) if i != j)
    return hard / max(1, n * (n - 1))


def _regular(n, start, radii=(1.0,)):
    """n unit-polygon vertices at angles start + 2*pi*k/n, with radii cycling through `radii` (a star alternates)."""
    return [(radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / n),
             radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]


def _heart(n=40):
    """n vertices of the classic heart curve (16 sin^3 t, 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), centred on its
    bounding box and scaled to circumradius 1, y pointing down."""
    pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
           for t in (2 * math.pi * k / n for k in range(n))]
    cy = (max(y for _, y in pts) + min(y for _, y in pts)) / 2
    r = max(math.hypot(x, y - cy) for x, y in pts)
    return [(x / r, (y - cy) / r) for x, y in pts]


_A = CROSS_ARM
UNIT_POLYGONS = {  # vertices of the polygonal shapes with circumradius 1, y pointing down
    "square": _regular(4, math.pi / 4), "triangle": _regular(3, -math.pi / 2), "heart": _heart(),
    "star": _regular(10, -math.pi / 2, (1.0, STAR_INNER)),
    "diamond": [(0, -1), (DIAMOND_WIDTH, 0), (0, 1), (-DIAMOND_WIDTH, 0)],
    "cross": [(-_A, -1), (_A, -1), (_A, -_A), (1, -_A), (1, _A), (_A, _A), (_A, 1), (-_A, 1), (-_A, _A), (-1, _A),
              (-1, -_A), (-_A, -_A)]}


def _shape_polygon(shape, cx, cy, r, angle):
    """Vertices (x, y) of a polygonal shape of circumradius r centred at (cx, cy), rotated by `angle`."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in UNIT_POLYGONS[shape]]


def _object_alpha(obj, size):
    """Anti-aliased coverage (size, size) in [0, 1] of one object: drawn supersampled, then box-averaged."""
    ss = 4 if size <= 128 else 2
    big = size * ss
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = obj["cx"] * big, obj["cy"] * big, obj["radius"] * big
    if obj["shape"] in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if obj["shape"] == "ring":
            ri = RING_INNER * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon(_shape_polygon(obj["shape"], cx, cy, r, obj["angle"]), fill=255)
    return np.asarray(mask.reduce(ss), dtype=np.float32) / 255


def draw_scene(scene, size):
    """Render a `BuiltinScenes.scene()` dict as a size x size RGB PIL image."""
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float32)
    other = base + (PATTERN_TONE if base.mean() < 128 else -PATTERN_TONE)
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in [0, 1]
    y, x = centres[:, None], centres[None, :]  # (H, 1), (1, W)
    period, angle = scene["period"], scene["stripe_angle"]
    if scene["pattern"] == "striped":
        on = np.floor((x * math.cos(angle) + y * math.sin(angle)) / period) % 2 == 1  # (H, W)
    elif scene["pattern"] == "checkered":
        on = (np.floor(x / period) + np.floor(y / period)) % 2 == 1
    else:
        on = np.zeros((size, size), dtype=bool)
    noise = torch.randn(size, size, 1, generator=_generator(scene["seed"])).numpy() * BACKGROUND_NOISE[scene["pattern"]]
    img = np.where(on[..., None], other, base) + noise  # (H, W, 3) float32
    for obj in reversed(scene["objects"]):  # the main object last, on top
        alpha = _object_alpha(obj, size)[..., None]  # (H, W, 1)
        img = img * (1 - alpha) + np.array(COLORS[obj["color"]], dtype=np.float32) * alpha
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


# -----------------------------------------------------------------------------
# 6. Readers of real data. Map-style readers (folder, jsonl, imagenet) have __len__/__getitem__; tar shards
# stream. A bad sample raises UnreadableSample; the loaders skip it, count it and warn at a limited rate.


class UnreadableSample(Exception):
    """A sample that cannot be used (corrupt image, missing or empty caption); loaders skip and count it."""


class SkipCounter:
    """Counts skipped samples of one reader and prints a warning at most every `interval` seconds (per process)."""

    def __init__(self, name, interval=30.0):
        self.name, self.interval, self.count, self._last = name, interval, 0, -math.inf

    def __call__(self, what, why):
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(f"data[{self.name}]: skipped {what}: {why} ({self.count} skipped so far in process {os.getpid()})",
                  file=sys.stderr, flush=True)


def _open_rgb(source):
    """Decode an image file (path or file object) to PIL RGB, or raise UnreadableSample."""
    try:
        with Image.open(source) as im:
            return im.convert("RGB")
    except Exception as e:  # any decoder error (truncated, unknown format, bomb) only loses this sample
        raise UnreadableSample(f"unreadable image ({type(e).__name__}: {e})") from None


def _require_path(path, key):
    if not path:
        raise ConfigError(f"{key} is empty: set --{key}=... for this data set kind")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}={path!r} does not exist")


class _ImageList:
    """Base of the map-style readers: `items[i] = (image path, caption or label)`."""

    class_names = None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        caption = self.caption(i)  # checked first: cheaper than decoding the image
        sample = {"image": _open_rgb(self.items[i][0]), "caption": caption}
        if self.class_names is not None:
            sample["label"] = self.items[i][1]
        return sample


class CaptionFolder(_ImageList):
    """`root/**/name.jpg|jpeg|png|webp|bmp` with a same-name `name.txt` caption; nested folders allowed."""

    def __init__(self, root, key="data.path"):
        _require_path(root, key)
        self.skips = SkipCounter("folder")
        self.items, self.num_missing_caption = [], 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()  # deterministic order
            names = set(filenames)
            for name in sorted(filenames):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                if stem + ".txt" in names:
                    self.items.append((os.path.join(dirpath, name), os.path.join(dirpath, stem + ".txt")))
                else:
                    self.num_missing_caption += 1
        if self.num_missing_caption:
            print(f"data[folder]: {root}: skipped {self.num_missing_caption} images without a same-name .txt caption",
                  file=sys.stderr, flush=True)
        if not self.items:
            raise ConfigError(f"{key}={root!r} holds no image with a same-name .txt caption "
                             f"({self.num_missing_caption} images without one)")

    def caption(self, i):
        try:
            with open(self.items[i][1], encoding="utf-8", errors="replace") as f:
                text = f.read().strip()
        except OSError as e:
            raise UnreadableSample(f"unreadable caption ({e})") from None
        if not text:
            raise UnreadableSample("empty caption")
        return text


class JsonlCaptions(_ImageList):
    """A JSONL file of {"image": path, "caption": text}; relative paths are relative to the file's folder."""

    def __init__(self, path, key="data.path"):
        _require_path(path, key)
        self.skips = SkipCounter("jsonl")
        base = os.path.dirname(os.path.abspath(path))
        self.items, self.num_missing_caption, self.num_bad_lines = [], 0, 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image, caption = record["image"], str(record.get("caption") or "").strip()
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.num_bad_lines += 1
                    continue
                if caption:
                    self.items.append((os.path.join(base, image), caption))
                else:
                    self.num_missing_caption += 1
        if self.num_missing_caption or self.num_bad_lines:
            print(f"data[jsonl]: {path}: skipped {self.num_missing_caption} records without a caption and "
                  f"{self.num_bad_lines} malformed lines", file=sys.stderr, flush=True)
        if not self.items:
            raise ConfigError(f"{key}={path!r} holds no record with an image and a caption")

    def caption(self, i):
        return self.items[i][1]


IMAGENET_CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.",
                              "a close-up photo of a {}.", "a photo of the {}.", "a good photo of a {}.")


class ImageFolderClasses(_ImageList):
    """
    ImageNet-style labelled folders `root/<class>/**/<image>`: label = index of the class in the sorted folder
    names (`class_names`, underscores read as spaces), caption = "a photo of a {class}." style, by index.
    """

    def __init__(self, root, key="data.path"):
        _require_path(root, key)
        self.skips = SkipCounter("imagenet")
        folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.class_names = [d.replace("_", " ") for d in folders]
        self.items = []
        for label, folder in enumerate(folders):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
                dirnames.sort()
                self.items += [(os.path.join(dirpath, n), label) for n in sorted(filenames)
                               if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
        if not self.items:
            raise ConfigError(f"{key}={root!r} holds no class folder with images (expected root/<class>/<image>)")

    def caption(self, i):
        name = self.class_names[self.items[i][1]]
        return IMAGENET_CAPTION_TEMPLATES[i % len(IMAGENET_CAPTION_TEMPLATES)].format(name)


def expand_braces(pattern):
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (zero padding kept); '{x,y}' lists too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        options = [str(i).zfill(len(r.group(1))) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def _pop_random(buffer, g):
    """Remove and return a uniformly random item of the list `buffer` (order of the rest not kept)."""
    j = int(torch.randint(len(buffer), (1,), generator=g))
    buffer[j], buffer[-1] = buffer[-1], buffer[j]
    return buffer.pop()


def _with_last(items):
    """(item, whether it is the last one) for each item of an iterable: one item of look-ahead."""
    it, end = iter(items), object()
    item = next(it, end)
    while item is not end:
        following = next(it, end)
        yield item, following is end
        item = following


def _decode_tar_sample(files):
    """{extension: bytes} of one key -> {"image", "caption"}, or raise UnreadableSample."""
    ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    if ext is None:
        raise UnreadableSample("no jpg/png/webp image")
    caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        raise UnreadableSample("missing caption")
    return {"image": _open_rgb(io.BytesIO(files[ext])), "caption": caption}


class TarShards:
    """
    WebDataset-style tar shards as img2dataset writes them: members `key.jpg|png|webp` + `key.txt` (+ `key.json`,
    ignored), grouped by key (the member name up to the first dot of its base name), read sequentially with the
    stdlib tarfile. `pattern` is a brace pattern (`shards/{00000..01023}.tar`), one file, or a folder of .tar files.
    Not indexable: iterate it (sorted shard order), or let the loaders split shards across ranks and workers.
    """

    class_names = None

    def __init__(self, pattern, key="data.path"):
        if not pattern:
            raise ConfigError(f"{key} is empty: set --{key}=... for this data set kind")
        if os.path.isdir(pattern):
            self.urls = sorted(os.path.join(pattern, n) for n in os.listdir(pattern) if n.endswith(".tar"))
        else:
            self.urls = expand_braces(pattern)
        missing = [u for u in self.urls if not os.path.isfile(u)]
        if not self.urls or missing:
            raise FileNotFoundError(f"{key}={pattern!r}: " + (f"{len(missing)} of {len(self.urls)} shards do not "
                                    f"exist, e.g. {missing[0]!r}" if missing else "no .tar shards found"))
        self.skips = SkipCounter("tar")

    holdout, role = 0, "all"  # set by held_out(): the first `holdout` samples of shard 0 are validation data

    def read_shard(self, shard, start=0):
        """Yield (k, key, {ext: bytes}) for key groups k >= start of shard `shard`, in stored order (without a
        held-out slice for the training view, only it for the validation view)."""
        if shard == 0 and self.role == "train":
            start = max(start, self.holdout)
        stop = self.holdout if self.role == "val" else None
        for k, key, files in self._read_shard(shard, start):
            if stop is not None and k >= stop:
                return
            yield k, key, files

    def _read_shard(self, shard, start=0):
        url, key, files, k = self.urls[shard], None, {}, -1
        try:
            with tarfile.open(url, "r|*") as tar:  # streaming mode: one sequential pass, works on pipes
                for member in tar:
                    if not member.isfile():
                        continue
                    slash = member.name.rfind("/") + 1
                    dot = member.name.find(".", slash)
                    name, ext = (member.name, "") if dot < 0 else (member.name[:dot], member.name[dot + 1:].lower())
                    if name != key:
                        if key is not None and k >= start:
                            yield k, key, files
                        key, files, k = name, {}, k + 1
                    if k >= start:  # groups before `start` are skipped without reading their data
                        files[ext] = tar.extractfile(member).read()
            if key is not None and k >= start:
                yield k, key, files
        except (tarfile.TarError, OSError, EOFError) as e:
            self.skips(url, f"unreadable tar shard, rest of it skipped ({type(e).__name__}: {e})")

    def epoch_order(self, epoch, seed, only=None):
        """The shard indices of `epoch` in a random order drawn from (seed, epoch); `only`: keep just those."""
        order = torch.randperm(len(self.urls), generator=_generator(_seed("shards", seed, epoch))).tolist()
        keep = None if only is None else set(only)
        return order if keep is None else [s for s in order if s in keep]

    def reader_groups(self, epoch, seed, rank=0, world_size=1, worker=0, num_workers=1, per_group=1, only=None):
        """
        The shards that loader worker `worker` of rank `rank` reads in `epoch`, as groups of `per_group` shards
        (data.shuffle_shards) read together: rank r takes order[r::world_size] of the epoch's order, and worker w
        of that rank takes [w::num_workers] of those. Every shard goes to exactly one reader, and a rank reads the
        same shards whatever its number of workers.
        """
        mine = self.epoch_order(epoch, seed, only)[rank::world_size][worker::num_workers]
        return [mine[i:i + per_group] for i in range(0, len(mine), per_group)]

    def _keyed(self, shard):
        for k, key, files in self.read_shard(shard):
            yield shard, k, key, files

    def shuffled(self, shards, buffer_size, g):
        """
        The key groups (shard, k, key, {ext: bytes}) of `shards`, read round-robin (one from each open shard in
        turn) through a shuffle buffer of `buffer_size` items: each new item goes in, and while the buffer holds
        more than buffer_size a random one (from generator g) comes out; at the end the buffer is drained in random
        order. One shard with buffer_size 0 gives the stored order. Raw bytes only (memory: buffer_size times the
        size of a stored sample); images are decoded when emitted, by `stream`.
        """
        open_shards, buffer = [self._keyed(shard) for shard in shards], []
        while open_shards:
            for it in list(open_shards):
                item = next(it, None)
                if item is None:
                    open_shards.remove(it)
                    continue
                buffer.append(item)
                if len(buffer) > buffer_size:
                    yield _pop_random(buffer, g)
        while buffer:
            yield _pop_random(buffer, g)

    def stream(self, epoch, groups, seed, buffer_size=0, start=(0, 0)):
        """
        The samples of one reader in `epoch`: its shard groups (`reader_groups`) one after the other, each through
        `shuffled` with a generator seeded by (seed, epoch, the group's shards). The position (group, n) counts the
        items of a group emitted so far; resuming from start = (group, n) replays that group from its start,
        decoding nothing until item n + 1, so a resumed stream equals an uninterrupted one.
        Yields (next position, shard, k, sample or None if unreadable); after a group's last item the next position
        is (group + 1, 0).
        """
        for group in range(start[0], len(groups)):
            skip = start[1] if group == start[0] else 0
            items = self.shuffled(groups[group], buffer_size, _generator(_seed("shuffle", seed, epoch, *groups[group])))
            for n, ((shard, k, key, files), last) in enumerate(_with_last(items), 1):
                if n <= skip:
                    continue
                try:
                    sample = _decode_tar_sample(files)
                except UnreadableSample as e:
                    self.skips(f"{self.urls[shard]}:{key}", e)
                    sample = None
                yield ((group + 1, 0) if last else (group, n)), shard, k, sample

    def __iter__(self):
        """Every usable sample once, shards in sorted order."""
        for shard in range(len(self.urls)):
            for _, key, files in self.read_shard(shard):
                try:
                    yield _decode_tar_sample(files)
                except UnreadableSample as e:
                    self.skips(f"{self.urls[shard]}:{key}", e)

    def captions(self, n):
        """The first n non-empty captions (no image decoding)."""
        out = []
        for shard in range(len(self.urls)):
            for _, _, files in self.read_shard(shard):
                text = files.get("txt", b"").decode("utf-8", errors="replace").strip()
                if text:
                    out.append(text)
                if len(out) >= n:
                    return out
        return out


# data.dataset -> its reader (the config's CHOICES["data.dataset"] is "builtin" and these keys; a test checks it)
READERS = {"folder": CaptionFolder, "jsonl": JsonlCaptions, "tar": TarShards, "imagenet": ImageFolderClasses}


def _check_usable(dataset, key):
    """Fail at start-up when none of the first CHECK_SAMPLES samples can be read."""
    errors = []
    if isinstance(dataset, TarShards):
        for shard in range(len(dataset.urls)):
            for _, _, files in dataset.read_shard(shard):
                try:
                    return _decode_tar_sample(files)
                except UnreadableSample as e:
                    errors.append(str(e))
                if len(errors) >= CHECK_SAMPLES:
                    break
    else:
        for i in range(min(len(dataset), CHECK_SAMPLES)):
            try:
                return dataset[i]
            except UnreadableSample as e:
                errors.append(str(e))
    raise ConfigError(f"{key}: none of the first {len(errors)} samples is usable (last error: "
                     f"{errors[-1] if errors else 'no samples'})")
