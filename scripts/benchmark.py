"""
Throughput benchmark of one stage-1 training step (CLIP + SSL + reconstruction, forward + backward + AdamW + EMA)
on synthetic batches of the right shapes, so it measures the model and not the data pipeline.

    python scripts/benchmark.py                                  # tiny preset on CPU
    python scripts/benchmark.py --preset=B --train.amp=bf16      # on a GPU: img/s, peak memory and MFU
    python scripts/benchmark.py --preset=L --compile

Reports img/s (CLIP images per second, i.e. the global batch B per step), ms/step, peak memory and, on CUDA,
model FLOPs utilization: FLOPs of one step counted by torch.utils.flop_counter (matmuls and attention), divided by
the step time and by the GPU's dense bf16 peak (--peak_tflops, default 989 for an H100 SXM).
"""

import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import parse_config  # noqa: E402
from pretrain import Student, Teacher, amp_setup, forward_backward, optimizer_step, param_groups  # noqa: E402


def synthetic_batch(cfg, device, gen):
    """Random tensors shaped like data.py's pre-training batch (one process)."""
    B, Bs, Br = cfg.data.batch_size, cfg.data.ssl_batch_size, cfg.data.rec_batch_size
    S, p = cfg.encoder.image_size, cfg.encoder.patch_size
    s = p * max(1, round(S // p * 7 / 16)) if cfg.data.local_crop_size == 0 else cfg.data.local_crop_size
    n = (S // p) ** 2
    masks = torch.rand(2 * Bs, n, generator=gen) < 0.3
    masks[Bs:] = False  # half of the global crops are masked
    tokens = torch.randint(1, cfg.text.vocab_size - 2, (B, cfg.text.context_length), generator=gen)
    tokens[:, -1] = cfg.text.vocab_size - 1  # end-of-text is the largest id
    batch = {"images": torch.randn(B, 3, S, S, generator=gen), "tokens": tokens,
             "global_crops": torch.randn(2 * Bs, 3, S, S, generator=gen),
             "local_crops": torch.randn(cfg.data.num_local_crops * Bs, 3, s, s, generator=gen),
             "masks": masks, "rec_images": torch.randn(Br, 3, S, S, generator=gen)}
    return {k: v.to(device) for k, v in batch.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="GPU dense bf16 peak, for MFU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student")
    args, rest = ap.parse_known_args()
    cfg = parse_config(rest)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    torch.manual_seed(0)
    student = Student(cfg).to(device)
    teacher = Teacher(student).to(device)
    opt = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-4, betas=cfg.optim.betas, eps=cfg.optim.eps)
    fwd = torch.compile(student) if args.compile else student
    autocast, scaler = amp_setup(cfg, device)
    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(cfg, device, gen)

    def step():
        forward_backward(fwd, teacher, batch, 0.07, cfg, autocast, scaler)
        optimizer_step(student, teacher, opt, scaler, cfg, 0.999)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    n_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"preset {cfg.preset} | device {device} | amp {cfg.train.amp} | compile {args.compile} | "
          f"trainable params {n_params / 1e6:.1f}M")
    print(f"batch B={cfg.data.batch_size} B_ssl={cfg.data.ssl_batch_size} B_rec={cfg.data.rec_batch_size} "
          f"local crops {cfg.data.num_local_crops} | image {cfg.encoder.image_size}px")
    print(f"{dt * 1000:.1f} ms/step | {cfg.data.batch_size / dt:.1f} img/s | {flops / 1e12:.3f} TFLOP/step")
    if device.type == "cuda":
        mfu = flops / dt / (args.peak_tflops * 1e12)
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | MFU {100 * mfu:.1f}% "
              f"(of {args.peak_tflops:.0f} TFLOP/s)")
    else:
        import resource
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (CPU)")


if __name__ == "__main__":
    main()
