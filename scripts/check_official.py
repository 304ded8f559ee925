"""
Check `load_official_vtp` against outputs recorded with the authors' code.

    python scripts/check_official.py --ckpt=path/to/VTP-Large-f16d64 --io=recorded_io.pt

The folder holds `config.json` + `model.safetensors` as released; `--io` is a `torch.load`-able dict with `images`
(ImageNet-normalized), optionally `tokens`, and any of `latents`, `recon`, `image_features`, `text_features`, `cls`,
`patches` recorded from the reference implementation. Prints the max absolute difference of each output and exits
non-zero if any exceeds --atol. Recorded tensors that are not finite are reported and skipped (they cannot be
compared).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import load_official_vtp, run_cli  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="released checkpoint folder (config.json + model.safetensors)")
    ap.add_argument("--io", required=True, help="recorded inputs/outputs (.pt)")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()
    model = load_official_vtp(args.ckpt)
    io = torch.load(args.io, map_location="cpu")
    x = io["images"].float()
    with torch.no_grad():
        feats = model.features(x)
        ours = {"latents": lambda: model.encode(x), "recon": lambda: model(x),
                "image_features": lambda: model.image_features(x), "cls": lambda: feats["cls"],
                "patches": lambda: feats["patches"]}
        if "tokens" in io:
            ours["text_features"] = lambda: model.text_features(io["tokens"])
        ok = True
        for name, fn in ours.items():
            if name not in io:
                continue
            ref = io[name].float()
            if not torch.isfinite(ref).all():
                print(f"{name:15s} recorded values are not finite ({(~torch.isfinite(ref)).sum().item()} of "
                      f"{ref.numel()}): skipped")
                continue
            err = (fn().float() - ref).abs().max().item()
            ok &= err <= args.atol
            print(f"{name:15s} max |diff| {err:.2e} {'ok' if err <= args.atol else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run_cli(main)
