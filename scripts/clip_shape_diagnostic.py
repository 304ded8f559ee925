"""
Does CLIP alone learn shape on the built-in data, and does its text tower keep the shape word?

The tiny VTP's image and text towers trained with the CLIP loss only (no SSL, no reconstruction, no augmentation,
constant lr after a short warm-up) on cached built-in scenes. Every --every steps it prints:

    zs     zero-shot top-1 on val scenes with the prompts "a {shape}"
    knn    weighted 20-NN (DINO's, as in evaluate.py) shape accuracy of the val image features against --knn_train
           train images
    tacc   how well the *text* features of the train captions separate the shapes (nearest class centroid)
    pcos   mean cosine between the prompt features of two different shapes (1.00 = the shape word is erased)

    python scripts/clip_shape_diagnostic.py                       # B=64, lr 1e-3, text lr x0.3 (tiny B, multiplier)
    python scripts/clip_shape_diagnostic.py --text_lr_mult=1      # one lr: tacc falls and pcos goes to 1.00
    python scripts/clip_shape_diagnostic.py --batch=32

Single-threaded unless OMP_NUM_THREADS says otherwise; 1200 steps at B=64 take about 11 minutes on one core.
"""

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import losses  # noqa: E402
from evaluate import knn_classify  # noqa: E402
from model import VTP, Config, ConfigError, run_cli, seeded  # noqa: E402
from pretrain import param_groups  # noqa: E402

OPTIONS = {"steps": 1200, "batch": 64, "lr": 1e-3, "text_lr_mult": 0.3, "warmup": 25, "scenes": 16000,
           "val": 500, "knn_train": 2000, "every": 100, "seed": 0}


def parse(argv):
    opts = dict(OPTIONS)
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in opts or not value:
            raise ConfigError(f"unknown option {arg!r}; options: " + " ".join(f"--{k}={v}" for k, v in OPTIONS.items()))
        opts[key] = type(OPTIONS[key])(value)
    return opts


def scenes(split, n):
    ds = data.BuiltinScenes(split)
    items = [ds[i] for i in range(n)]
    images = data.normalize(torch.stack([data.to_tensor(s["image"]) for s in items]))
    return images, [s["caption"] for s in items], torch.tensor([s["label"] for s in items])


@torch.no_grad()
def report(vtp, prompts, val, train_images, train_text, train_y):
    (xv, yv) = val
    f = vtp.image_features(xv)
    p = vtp.text_features(prompts)
    zs = ((f @ p.T).argmax(1) == yv).float().mean().item()
    fk = torch.cat([vtp.image_features(x) for x in train_images.split(500)])
    knn = (knn_classify(fk, train_y, f, len(data.SHAPES)).argmax(1) == yv).float().mean().item()
    t = vtp.text_features(train_text)
    centroids = F.normalize(torch.stack([t[train_y == c].mean(0) for c in range(len(data.SHAPES))]), dim=-1)
    tacc = ((t @ centroids.T).argmax(1) == train_y).float().mean().item()
    pcos = (p @ p.T)[~torch.eye(len(p), dtype=torch.bool)].mean().item()
    return f"zs {zs:.3f} knn {knn:.3f} tacc {tacc:.3f} pcos {pcos:.2f}"


def main(argv):
    o = parse(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = Config()
    print(f"caching {o['scenes']} train and {o['val']} val scenes ...", flush=True)
    x, captions, y = scenes("train", o["scenes"])
    xv, _, yv = scenes("val", o["val"])
    tokenizer = data.BPETokenizer(cfg.text.vocab_size, cfg.text.context_length).train(captions[:4000])
    tokens, prompts = tokenizer(captions), tokenizer([f"a {s}" for s in data.SHAPES])
    k = min(o["knn_train"], o["scenes"])
    with seeded(o["seed"]):
        vtp = VTP(cfg)
    groups = param_groups(vtp, cfg.optim.weight_decay, o["text_lr_mult"])  # as pretrain.py: decay split, lr_mult
    opt = torch.optim.AdamW(groups, lr=o["lr"], betas=cfg.optim.betas, eps=cfg.optim.eps)
    gen = torch.Generator().manual_seed(o["seed"])
    t0 = time.time()
    for step in range(o["steps"] + 1):
        if step % o["every"] == 0:
            print(f"step {step} | {report(vtp, prompts, (xv, yv), x[:k], tokens[:k], y[:k])} | "
                  f"scale {vtp.logit_scale.exp().item():.1f} | {time.time() - t0:.0f}s", flush=True)
        if step == o["steps"]:
            break
        idx = torch.randint(0, len(y), (o["batch"],), generator=gen)
        for g in opt.param_groups:
            g["lr"] = o["lr"] * g["lr_mult"] * min(1.0, (step + 1) / o["warmup"])
        loss = losses.clip_loss(vtp.image_features(x[idx]), vtp.text_features(tokens[idx]), vtp.logit_scale, 0, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vtp.parameters(), cfg.optim.grad_clip)
        opt.step()
        with torch.no_grad():
            vtp.logit_scale.clamp_(0, math.log(100))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
