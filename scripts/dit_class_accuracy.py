"""
Do a DiT's samples show their class? A small CNN judge trained on the built-in data scores them.

    python scripts/dit_class_accuracy.py --dit.ckpt=runs/dit                   # cfg scales 1 and 4, 256 samples
    python scripts/dit_class_accuracy.py --dit.ckpt=runs/dit/ckpt_0006000.pt --scales=1,2,4 --n=512

The built-in scenes are labelled by the shape of their main object (data.SHAPES). The judge is a 4-layer CNN trained
from scratch on 20,000 training scenes at the DiT's image size (about 2 minutes on 2 CPU cores; it reaches ~99% on
the val split, printed). Each DiT sample of class c is decoded by the DiT's tokenizer and counts as correct when the
judge says c. Chance is 1/8. This is a check for the built-in data only, not a published metric: the paper's
measure is gFID on ImageNet (evaluate.py gen).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_dit  # noqa: E402
from data import build_eval_loader  # noqa: E402
from model import Config, parse_config, run_cli  # noqa: E402


def load_images(cfg, split, size, n):
    """n built-in images of `split` at `size` px (ImageNet-normalized) and their shape labels."""
    xs, ys = [], []
    for batch in build_eval_loader(cfg, split, size, 256, max_images=n):
        xs.append(batch["images"])
        ys.append(batch["labels"].long())
    return torch.cat(xs), torch.cat(ys)


def train_judge(cfg, size, num_images=20000, epochs=6, seed=0):
    """A CNN shape classifier on ImageNet-normalized images (B, 3, size, size) -> logits (B, 8)."""
    torch.manual_seed(seed)
    x, y = load_images(cfg, "train", size, num_images)
    judge = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, int(y.max()) + 1))
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            xb = x[idx]
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, xb.flip(-1), xb)  # the DiT sees flips too
            loss = F.cross_entropy(judge(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return judge.eval()


@torch.no_grad()
def accuracy(judge, images, labels):
    return (judge(images).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def sample_accuracy(judge, ckpt_path, n=256, cfg_scales=(1.0,), num_steps=50, seed=0):
    """For each guidance scale, the fraction of n DiT samples (classes cycling, EMA weights, Euler, the same noise
    for every scale) that the judge assigns to their class -> list of floats."""
    ema, ckpt = train_dit.load_dit(ckpt_path)
    vtp = train_dit.tokenizer_path_of(ckpt)[1]
    mean, std = ckpt["latent_stats"]["mean"], ckpt["latent_stats"]["std"]
    d = Config.from_dict(ckpt["config"]).dit
    fm = train_dit.FlowMatching(ema.num_classes)
    y = torch.arange(n) % ema.num_classes
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, ema.in_channels, ema.input_size, ema.input_size, generator=g)
    accs = []
    for scale in cfg_scales:
        z = fm.sample(ema, noise, y, num_steps, "euler", d.time_shift, scale, d.cfg_interval)
        accs.append(accuracy(judge, vtp.decode(train_dit.denormalize_latents(z, mean, std)), y))
    return accs


def main(argv):
    opts = {"--scales": "1,4", "--n": "256", "--steps": "50"}
    rest = []
    for a in argv:
        key = a.split("=", 1)[0]
        if key in opts:
            opts[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    cfg = parse_config(rest, aliases=train_dit.ALIASES)
    path = cfg.dit.ckpt or cfg.dit.out_dir
    ema, ckpt = train_dit.load_dit(path)
    size = ema.input_size * train_dit.tokenizer_path_of(ckpt)[1].patch_size  # the tokenizer's image size
    print(f"training the judge on 20000 built-in scenes at {size} px ...")
    judge = train_judge(cfg, size)
    print(f"judge accuracy on 1000 real val scenes: {accuracy(judge, *load_images(cfg, 'val', size, 1000)):.3f}")
    scales = [float(v) for v in opts["--scales"].split(",")]
    for s, acc in zip(scales, sample_accuracy(judge, path, int(opts["--n"]), scales, int(opts["--steps"]))):
        print(f"{path}: class accuracy of {opts['--n']} samples at cfg scale {s:g}, {opts['--steps']} Euler steps: "
              f"{acc:.3f} (chance {1 / ema.num_classes:.3f})")

if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
