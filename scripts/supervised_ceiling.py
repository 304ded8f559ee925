"""
How well can the tiny encoder learn shape at all in a given number of steps? The yardstick for the linear probe.

The tokenizer's ViT encoder (the preset's, from the same seeded init as pretrain.py) plus a linear layer on the final
[CLS] token, trained *supervised* with cross-entropy on the shape labels of fresh built-in scenes (the images CLIP
sees: ADM centre crops, no augmentation), AdamW with pretrain.py's betas and weight decay, linear warm-up over 5% of
the steps and cosine decay to 0. Every --steps/10 steps it prints the top-1 accuracy on --val val scenes.

    python scripts/supervised_ceiling.py                          # 1000 steps, B=64, lr 1e-3, on the CPU
    python scripts/supervised_ceiling.py --run.device=cuda --run.amp=fp32 --steps=3000

Options: --steps=1000 --batch=64 --lr=0.001 --val=1000; any other --key=value is a config flag (e.g. --encoder.depth=3).
"""

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from evaluate import labelled_images  # noqa: E402
from model import VTP, amp_setup, parse_config, run_cli, seeded, setup_distributed  # noqa: E402

OPTIONS = {"steps": 1000, "batch": 64, "lr": 1e-3, "val": 1000}


def labelled_batch(dataset, indices, size):
    """Training scenes at random indices -> (ImageNet-normalized ADM centre crops (n, 3, size, size), labels (n,)),
    the same images as evaluate.labelled_images gives for the first n of a split."""
    samples = [dataset[i] for i in indices]
    images = data._stack_normalized([data.adm_center_crop(s["image"], size) for s in samples])
    return images, torch.tensor([s["label"] for s in samples])


def main(argv):
    opts, flags = dict(OPTIONS), []
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if key in opts:
            opts[key] = type(OPTIONS[key])(value)
        else:
            flags.append(arg)
    cfg = parse_config(flags)
    device = setup_distributed(cfg.run.device)[3]
    autocast, _ = amp_setup(cfg.run.amp, device)
    train = data.build_dataset(cfg, "train")
    size, steps = cfg.encoder.image_size, opts["steps"]
    xv, yv = (t.to(device) for t in labelled_images(cfg, "val", size, opts["val"]))  # the probe's val images
    num_classes = len(data.SHAPES)
    with seeded(cfg.run.seed):
        encoder = VTP(cfg).trunk.to(device)
        head = torch.nn.Linear(cfg.encoder.width, num_classes).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=opts["lr"], betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    warmup, curve = max(1, steps // 20), []
    for step in range(steps):
        lr = opts["lr"] * ((step + 1) / warmup if step < warmup
                           else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = labelled_batch(train, torch.randint(0, len(train), (opts["batch"],), generator=gen).tolist(), size)
        with autocast():
            loss = F.cross_entropy(head(encoder.forward_features(x.to(device))["cls"]).float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            with torch.no_grad(), autocast():
                acc = (head(encoder.forward_features(xv)["cls"]).argmax(1) == yv).float().mean().item()
            curve.append({"step": step + 1, "loss": loss.item(), "val_top1": acc})
            print(f"step {step + 1} | loss {loss.item():.3f} | val top-1 {100 * acc:.1f}%", flush=True)
    return curve


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
