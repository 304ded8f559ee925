"""
Look at the built-in data and time the pre-training data pipeline.

    python scripts/preview_data.py                       # tiny preset: 32 px
    python scripts/preview_data.py --encoder.image_size=64 --data.num_workers=2
    python scripts/preview_data.py --shards=16 --per_shard=256 --encoder.image_size=256   # -> runs/preview/shards/

Writes (under --out, default runs/preview/):
  builtin_samples.png  a grid of training scenes, each upscaled (nearest) with its caption underneath;
  builtin_crops.png    one batch's DINOv2 views: global crops with their iBOT masks darkened, then local crops;
and prints the samples/s of the full multi-crop pipeline (`build_pretrain_loader`: scene drawing, CLIP image,
tokens, 2 global + n local crops of the SSL subset, masks) at the given settings and at 256 px (patch 16).
With --shards=N it instead writes the first N x --per_shard training scenes as img2dataset-style tar shards
(key.jpg + key.txt) under --out/shards/, to rehearse the real-data path (`--data.dataset=tar`) without data.
Any `--key=value` of the shared config applies (model.parse_config).
"""

import io
import os
import sys
import tarfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import data  # noqa: E402
from model import parse_config, run_cli  # noqa: E402

CELL = 128  # displayed side of one sample in the grid
COLUMNS = 6
TEXT_LINES = 4  # caption lines under each sample
LINE_HEIGHT = 12
WRAP = 21  # characters per caption line with PIL's default font at CELL = 128


def write_shards(dataset, folder, n_shards, per_shard):
    """The first n_shards * per_shard scenes of `dataset` as tar shards 00000.tar, ... (key.jpg + key.txt each)."""
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                sample, jpg = dataset[i], io.BytesIO()
                sample["image"].save(jpg, format="JPEG", quality=95)
                for ext, payload in (("jpg", jpg.getvalue()), ("txt", sample["caption"].encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(folder, "{00000.." + f"{n_shards - 1:05d}" + "}.tar")


def sample_grid(dataset, n):
    """n samples of `dataset`, upscaled to CELL px with their wrapped captions below, as one RGB image."""
    rows = (n + COLUMNS - 1) // COLUMNS
    cell_h = CELL + TEXT_LINES * LINE_HEIGHT + 6
    grid = Image.new("RGB", (COLUMNS * CELL, rows * cell_h), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i in range(n):
        sample = dataset[i]
        x, y = (i % COLUMNS) * CELL, (i // COLUMNS) * cell_h
        grid.paste(sample["image"].resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(sample["caption"], WRAP)[:TEXT_LINES]
        for k, line in enumerate(lines):
            draw.text((x + 3, y + CELL + 3 + k * LINE_HEIGHT), line, fill="black", font=font)
    return grid


def crops_panel(batch, patch_size, n_images=4):
    """Rows = SSL images; columns = global crops 1, 2 (iBOT-masked patches darkened), then the local crops at scale.
    `batch`: a loader batch after `data.batch_to_device` (normalized float images)."""
    def to_img(x):  # normalized (3, H, W) -> PIL
        return Image.fromarray((data.denormalize(x).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())

    b_ssl = len(batch["ssl_index"])
    n_local = len(batch["local_crops"]) // b_ssl
    S = batch["global_crops"].shape[-1]
    grid_side = S // patch_size
    scale = max(1, CELL // S)
    side = S * scale
    local_side = batch["local_crops"].shape[-1] * scale if n_local else 0
    panel = Image.new("RGB", (2 * side + n_local * local_side, min(n_images, b_ssl) * side), "white")
    for i in range(min(n_images, b_ssl)):
        for c in range(2):
            row = c * b_ssl + i  # crop-major
            x = batch["global_crops"][row].clone()
            mask = batch["masks"][row].view(grid_side, grid_side)
            dark = mask.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)  # (S, S)
            x = torch.where(dark, data.normalize(data.denormalize(x) * 0.3), x)
            panel.paste(to_img(x).resize((side, side), Image.Resampling.NEAREST), (c * side, i * side))
        for c in range(n_local):
            crop = to_img(batch["local_crops"][c * b_ssl + i])  # crop-major
            crop = crop.resize((local_side, local_side), Image.Resampling.NEAREST)
            panel.paste(crop, (2 * side + c * local_side, i * side))
    return panel


def samples_per_second(cfg, n_batches):
    """Throughput of build_pretrain_loader: image-text samples (the B of every batch) per second."""
    tokenizer = data.build_tokenizer(cfg)
    loader = data.build_pretrain_loader(cfg, tokenizer)
    next(loader)  # start-up (workers, first permutation) is not counted
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    return n_batches * cfg.data.batch_size / (time.perf_counter() - t0)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = {"out": "runs/preview", "shards": "0", "per_shard": "1000"}  # this script's own flags
    for arg in list(argv):
        key, _, value = arg[2:].partition("=")
        if arg.startswith("--") and key in opts:
            opts[key] = value
            argv.remove(arg)
    out = opts["out"]
    cfg = parse_config(argv)
    os.makedirs(out, exist_ok=True)
    if int(opts["shards"]):  # only write the built-in scenes as tar shards
        pattern = write_shards(data.build_dataset(cfg, "train"), os.path.join(out, "shards"), int(opts["shards"]),
                               int(opts["per_shard"]))
        print(f"wrote {opts['shards']} shards of {opts['per_shard']} scenes at {cfg.encoder.image_size} px: "
              f"--data.dataset=tar --data.path='{pattern}'")
        return

    # 1. what the scenes look like at the training resolution
    dataset = data.build_dataset(cfg, "train")
    path = os.path.join(out, "builtin_samples.png")
    sample_grid(dataset, 24).save(path)
    print(f"wrote {path} ({cfg.data.dataset} data, {cfg.encoder.image_size} px)")

    # 2. one batch's multi-crop views and masks
    batch = next(data.build_pretrain_loader(cfg, data.build_tokenizer(cfg)))  # as the workers send it: uint8 images
    path = os.path.join(out, "builtin_crops.png")
    crops_panel(data.batch_to_device(batch, torch.device("cpu")), cfg.encoder.patch_size).save(path)
    print(f"wrote {path}; loader batch: " + ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
                                                      for k, v in batch.items() if torch.is_tensor(v)))

    # 3. throughput of the full pipeline, at these settings and at 256 px
    d = cfg.data
    print(f"pipeline: B={d.batch_size} (SSL {d.ssl_batch_size} x [2 global + {d.num_local_crops} local], "
          f"rec {d.rec_batch_size}), num_workers={d.num_workers}, torch threads={torch.get_num_threads()}")
    print(f"  {cfg.encoder.image_size:>3} px (patch {cfg.encoder.patch_size}, local {data.local_crop_size(cfg)}): "
          f"{samples_per_second(cfg, max(10, 4 * d.num_workers)):7.1f} samples/s")
    big = parse_config(argv + ["--encoder.image_size=256", "--encoder.patch_size=16"])
    n = max(3, 3 * d.num_workers)  # enough batches that prefetching at start-up does not inflate the rate
    print(f"  256 px (patch 16, local {data.local_crop_size(big)}): {samples_per_second(big, n):7.1f} samples/s")


if __name__ == "__main__":
    run_cli(main)
