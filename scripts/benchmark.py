"""
Throughput benchmarks on synthetic inputs of the right shapes, so they measure the models and not the data pipeline
(--real_data: stage 1 on the configured data, with the time spent waiting for batches).

    python scripts/benchmark.py                                          # stage-1 step, tiny preset, on CPU
    python scripts/benchmark.py --preset=B --compile                     # on a GPU (bf16): img/s, memory, MFU
    python scripts/benchmark.py --preset=S --run.amp=fp16                # fp16 autocast with a GradScaler
    python scripts/benchmark.py --what=stage2 --preset=B                 # decoder + discriminator step (stage 2)
    python scripts/benchmark.py --what=dit --dit_model=XL --batch=256    # DiT-XL/1 training step on f16d64 latents
    python scripts/benchmark.py --what=sample --dit_model=XL --batch=64  # 250-step Euler sampling + decoding
    python scripts/benchmark.py --what=fid --batch=250                   # FID Inception features (fp32)
    python scripts/benchmark.py --real_data --data.dataset=tar --data.path='shards/{00000..00007}.tar'
                                                      # stage 1 on real batches: the data loader's share of a step

What one step is:
  stage1  one pre-training step: teacher forward, student forward (CLIP + SSL + reconstruction), backward, AdamW, EMA
  stage2  one decoder GAN step: frozen encoder, decoder forward/backward, discriminator step (GAN on from step 0)
  dit     one flow-matching step of the DiT (forward, backward, AdamW, EMA) on (latent_dim, S/p, S/p) latents
  sample  one batch of --sample_steps Euler steps with the DiT, then the pixel decoder (img/s = batch / time)
  fid     one batch of 256 px images through the FID Inception network (random weights: timing only)

Reports ms/step, img/s, peak memory and, on CUDA, model FLOPs utilization (MFU): model FLOPs of one step divided
by the step time and by the GPU's dense bf16 peak (--peak_tflops, 989 for an H100 SXM). For stage 1 the FLOPs are
written out part by part (`stage1_flops`: every matmul of every pass, backward = 2x forward) and printed next to
the count of torch.utils.flop_counter; the other steps use that counter. Elementwise work, norms and softmaxes are
not counted (the usual MFU convention), so they show up as lost utilization. LPIPS is off unless --lpips (random
VGG weights, for its cost only), as in a run without LPIPS weight files.

--check adds three diagnostics on CUDA: host syncs during two steps (torch.cuda.set_sync_debug_mode), graphs
compiled and recompiled after warm-up (--compile), and the CUDA kernels of one step by time, with the attention
kernels (flash / memory-efficient / math) named.
"""

import argparse
import os
import sys
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import losses  # noqa: E402
from model import VTP, adamw, amp_setup, parse_config, run_cli, seeded, swiglu_hidden  # noqa: E402
from pretrain import Student, Teacher, forward_backward, optimizer_step, param_groups, stage2_step  # noqa: E402

# -----------------------------------------------------------------------------
# Stage-1 FLOPs, part by part: 2 FLOPs per multiply-add of every matmul (attention scores and values included).


def vit_flops(n_img, n_tokens, width, depth, mlp_hidden):
    """Forward FLOPs of `depth` pre-norm blocks (fused qkv, proj, SwiGLU, full attention) on n_img x n_tokens."""
    per_token = 2 * (4 * width * width + 3 * width * mlp_hidden)  # qkv + proj, w1 + w2 + w3
    attention = 2 * 2 * n_tokens * n_tokens * width  # q k^T and attn v
    return n_img * depth * (n_tokens * per_token + attention)


def encoder_flops(cfg, n_img, size, latents=False):
    """Forward FLOPs of the VTP encoder on n_img images of side `size` (patch embed, blocks, [bottleneck])."""
    e = cfg.encoder
    n = (size // e.patch_size) ** 2
    f = n_img * 2 * n * e.width * 3 * e.patch_size ** 2  # patch embedding
    f += vit_flops(n_img, n + 1, e.width, e.depth, swiglu_hidden(e.width, e.mlp_hidden))
    if latents:
        f += n_img * 2 * n * e.width * e.latent_dim  # bottleneck Linear(D -> latent_dim)
    return f


def head_flops(cfg, in_dim, n_tokens):
    """Forward FLOPs of the DINO head (MLP to the bottleneck, then the K prototypes) on n_tokens vectors."""
    h = cfg.head
    dims = [in_dim] + [h.hidden_dim] * (h.nlayers - 1) + [h.bottleneck_dim, h.num_prototypes]
    return n_tokens * sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def stage1_flops(cfg, n_masked):
    """
    Model FLOPs of one stage-1 step on one process, as {part: FLOPs}. Student parts count forward + backward
    (3x forward; the patch embedding's backward needs no input gradient, so it counts 2x); the teacher is forward
    only. n_masked: masked patch tokens of the step (the iBOT head input). Parts whose lambda is 0 are left out.
    """
    d, e, t, lc = cfg.data, cfg.encoder, cfg.text, cfg.loss
    S, p = e.image_size, e.patch_size
    feat_dim = e.latent_dim if e.latent_features else e.width

    def embed(n_img, size):  # patch-embedding forward FLOPs (counted 2x instead of 3x below)
        return n_img * 2 * (size // p) ** 2 * e.width * 3 * p * p

    def trained(fwd, n_img=0, size=S):  # forward + backward, minus the input gradient of the patch embedding
        return 3 * fwd - (embed(n_img, size) if n_img else 0)

    parts = {}
    B, Bs, Br = d.batch_size, d.ssl_batch_size, d.rec_batch_size
    if lc.lambda_clip > 0:
        parts["encoder CLIP"] = trained(encoder_flops(cfg, B, S, latents=e.latent_features), B)
        L = t.context_length
        mlp = B * L * t.depth * 2 * 2 * t.width * int(t.width * t.mlp_ratio)  # GELU MLP: c_fc + c_proj
        text = vit_flops(B, L, t.width, t.depth, 0) + mlp
        text += B * 2 * t.width * t.embed_dim  # text_projection at the end-of-text token
        clip = B * 2 * feat_dim * t.embed_dim + 2 * 2 * B * B * t.embed_dim  # visual_proj + both logit matrices
        parts["text tower"] = trained(text)
        parts["CLIP proj + logits"] = trained(clip)
    if lc.lambda_ssl > 0:
        s_local = data.local_crop_size(cfg)
        n_local = d.num_local_crops * Bs
        enc = encoder_flops(cfg, 2 * Bs, S, e.latent_features) + encoder_flops(cfg, n_local, s_local, e.latent_features)
        parts["encoder SSL (student)"] = trained(enc, 2 * Bs) - embed(n_local, s_local)
        parts["DINO head (student)"] = trained(head_flops(cfg, feat_dim, 2 * Bs + n_masked + n_local))
        parts["encoder SSL (teacher)"] = encoder_flops(cfg, 2 * Bs, S, e.latent_features)
        parts["DINO head (teacher)"] = head_flops(cfg, feat_dim, 2 * Bs + n_masked)
    if lc.lambda_rec > 0:
        dc = cfg.decoder
        n = (S // p) ** 2
        parts["encoder rec"] = trained(encoder_flops(cfg, Br, S, latents=True), Br)
        dec = Br * 2 * n * (e.latent_dim * dc.width + dc.width * 3 * p * p)  # 1x1 convs in and out
        dec += vit_flops(Br, n, dc.width, dc.depth, swiglu_hidden(dc.width, dc.mlp_hidden))
        parts["pixel decoder"] = trained(dec)
    return parts


# -----------------------------------------------------------------------------
# Synthetic inputs


def synthetic_batch(cfg, device, gen):
    """Random tensors shaped like data.py's pre-training batch (one process); 30% of half the global crops masked."""
    B, Bs, Br = cfg.data.batch_size, cfg.data.ssl_batch_size, cfg.data.rec_batch_size
    S, p = cfg.encoder.image_size, cfg.encoder.patch_size
    s = data.local_crop_size(cfg)
    n = (S // p) ** 2
    masks = torch.rand(2 * Bs, n, generator=gen) < 0.3
    masks[Bs:] = False  # half of the global crops are masked
    tokens = torch.randint(1, cfg.text.vocab_size - 2, (B, cfg.text.context_length), generator=gen)
    tokens[:, -1] = cfg.text.vocab_size - 1  # end-of-text is the largest id
    batch = {"images": torch.randn(B, 3, S, S, generator=gen), "tokens": tokens,
             "global_crops": torch.randn(2 * Bs, 3, S, S, generator=gen),
             "local_crops": torch.randn(cfg.data.num_local_crops * Bs, 3, s, s, generator=gen),
             "masks": masks, "mask_indices": masks.flatten().nonzero().flatten(),
             "rec_images": torch.randn(Br, 3, S, S, generator=gen)}
    return {k: v.to(device) for k, v in batch.items()}


def random_lpips(rec_loss, device):
    """Give a ReconstructionLoss an LPIPS with random weights (same cost as the real one)."""
    rec_loss.lpips = losses.LPIPS().to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# The steps: each builder returns (step function, images per step, FLOPs by part or None, modules to report)


def build_stage1(cfg, args, device):
    with seeded(0):
        student = Student(cfg).to(device)
    if args.lpips:
        random_lpips(student.rec_loss, device)
    teacher = Teacher(student).to(device)
    opt = adamw(param_groups(student, 0.05), device, lr=1e-4, betas=cfg.optim.betas, eps=cfg.optim.eps)
    fwd = torch.compile(student) if args.compile else student
    teacher_fwd = torch.compile(teacher) if args.compile else teacher
    autocast, scaler = amp_setup(cfg.run.amp, device)
    batch = synthetic_batch(cfg, device, torch.Generator().manual_seed(0))
    loader = data.build_pretrain_loader(cfg, data.build_tokenizer(cfg)) if args.real_data else None
    waits = []  # --real_data: seconds the step waited for its batch

    def step():
        b = batch
        if loader is not None:  # the real loader (data.num_workers workers): time the wait for the next batch
            t0 = time.perf_counter()
            b = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in next(loader).items()}
            waits.append(time.perf_counter() - t0)
        forward_backward(fwd, teacher_fwd, b, 0.07, cfg, autocast, scaler)
        optimizer_step(student, teacher, opt, scaler, cfg, 0.999)

    step.waits = waits
    parts = stage1_flops(cfg, batch["mask_indices"].numel())
    return step, cfg.data.batch_size, parts, student


def build_stage2(cfg, args, device):
    cfg.loss.gan_start = 0  # the discriminator runs every step
    with seeded(0):
        vtp = VTP(cfg).to(device).requires_grad_(False).eval()
        disc = losses.PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers).to(device)
    decoder = vtp.pixel_decoder.requires_grad_(True).train()
    rec_loss = losses.ReconstructionLoss(cfg.loss.l1_weight, cfg.loss.lpips_weight).to(device)
    if args.lpips:
        random_lpips(rec_loss, device)
    opt_g = adamw(decoder.parameters(), device, lr=1e-4, weight_decay=0.0)
    opt_d = adamw(disc.parameters(), device, lr=1e-4, weight_decay=0.0)
    autocast, scaler = amp_setup(cfg.run.amp, device)
    dec = torch.compile(decoder) if args.compile else decoder
    B, S = args.batch or cfg.data.batch_size, cfg.encoder.image_size
    x = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        stage2_step(vtp, dec, disc, rec_loss, opt_g, opt_d, scaler, x, 0, cfg, autocast)

    return step, B, None, decoder


def dit_setup(cfg, args, device):
    import train_dit
    grid = cfg.encoder.image_size // cfg.encoder.patch_size
    dit = train_dit.build_dit(args.dit_model, grid, cfg.encoder.latent_dim, 1000, patch_size=1).to(device)
    return train_dit, dit, grid


def build_dit(cfg, args, device):
    train_dit, dit, grid = dit_setup(cfg, args, device)
    import copy
    ema = copy.deepcopy(dit).requires_grad_(False)
    fm = train_dit.FlowMatching(1000)
    opt = adamw(dit.parameters(), device, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
    amp, scaler = amp_setup(cfg.run.amp, device)
    model = torch.compile(dit) if args.compile else dit
    B = args.batch or 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.encoder.latent_dim, grid, grid, generator=g).to(device)
    y = torch.randint(0, 1000, (B,), generator=g).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        train_dit.train_step(model, dit, ema, fm, opt, scaler, x, y, gen, amp, 1.0, 0.9999)

    parts = {"DiT forward + backward (3x forward)": 3 * B * dit_forward_flops(dit, x, y)}
    return step, B, parts, dit


def dit_forward_flops(dit, x, y):
    """FLOPs of one DiT forward on one image (counted at batch 1, so the counter's eager pass fits in memory)."""
    with torch.no_grad(), FlopCounterMode(display=False) as one:
        dit(x[:1], torch.rand(1, device=x.device), y[:1])
    return one.get_total_flops()


def build_sample(cfg, args, device):
    train_dit, dit, grid = dit_setup(cfg, args, device)
    dit.eval().requires_grad_(False)
    model = torch.compile(dit) if args.compile else dit
    vtp = VTP(cfg).to(device).eval()
    fm = train_dit.FlowMatching(1000)
    amp, _ = amp_setup(cfg.run.amp, device)
    B = args.batch or 16
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(B, cfg.encoder.latent_dim, grid, grid, generator=g).to(device)
    y = torch.randint(0, 1000, (B,), generator=g).to(device)
    mean, std = torch.zeros(cfg.encoder.latent_dim, device=device), torch.ones(cfg.encoder.latent_dim, device=device)

    @torch.no_grad()
    def step():
        with amp():
            z = fm.sample(model, noise, y, num_steps=args.sample_steps)
        train_dit.decode_latents(vtp, z, mean, std, amp)  # uint8 on the host: waits for the GPU

    with torch.no_grad(), FlopCounterMode(display=False) as dec:
        vtp.decode(noise[:1])
    parts = {f"DiT forward x{args.sample_steps}": B * dit_forward_flops(dit, noise, y) * args.sample_steps,
             "pixel decoder": B * dec.get_total_flops()}
    return step, B, parts, dit


def build_fid(cfg, args, device):
    import evaluate
    net = evaluate.FIDInceptionV3().to(device).eval()
    B = args.batch or 50
    images = torch.rand(B, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def step():
        net(images)

    return step, B, None, net


BUILDERS = {"stage1": build_stage1, "stage2": build_stage2, "dit": build_dit, "sample": build_sample,
            "fid": build_fid}

# -----------------------------------------------------------------------------
# Diagnostics


def count_syncs(step, n=2):
    """Run n steps with CUDA sync debugging on; returns the distinct warnings (host syncs) with their counts."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    found = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{os.path.basename(w.filename)}:{w.lineno}"
            found[where] = found.get(where, 0) + 1
    return found


def kernel_table(step, top=12):
    """The CUDA kernels of one step by total time, as printable lines, and the attention kernels' names."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    lines = [f"  {100 * e.device_time_total / total:5.1f}%  {e.count:5d}x  {e.key[:110]}" for e in events[:top]]
    attn = sorted({e.key[:80] for e in events if any(k in e.key.lower() for k in ("flash", "fmha", "attention",
                                                                                    "efficient"))})
    return lines, attn, total / 1000


def graphs_compiled():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="stage1", choices=tuple(BUILDERS), help="which step to time")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (compilation happens here)")
    ap.add_argument("--batch", type=int, default=0, help="batch of stage2/dit/sample/fid (0 = a default)")
    ap.add_argument("--dit_model", default="B", help="DiT size for --what=dit/sample (tiny, S, B, L, XL)")
    ap.add_argument("--sample_steps", type=int, default=250, help="Euler steps for --what=sample")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="GPU dense bf16 peak, for MFU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the trained module (and the teacher)")
    ap.add_argument("--lpips", action="store_true", help="include LPIPS (random VGG weights) in the reconstruction")
    ap.add_argument("--check", action="store_true", help="CUDA: count host syncs and recompiles, list kernels")
    ap.add_argument("--real_data", action="store_true",
                    help="stage1: batches from the configured data (--data.*) instead of synthetic ones, and the "
                         "loader's share of the step time")
    args, rest = ap.parse_known_args()
    cfg = parse_config(rest)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")
    cuda = device.type == "cuda"
    step, n_img, parts, module = BUILDERS[args.what](cfg, args, device)

    # On CPU the fused SDPA kernel is invisible to the counter; the math kernel's matmuls are counted
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH] if cuda else [SDPBackend.MATH]
    counted = 0
    if parts is None or args.what == "stage1":  # (stage 1: to print next to the written-out count)
        # Eager for this pass: a compiled function first called under the counter's dispatch mode would stay
        # uncompiled (seen on torch 2.11: "graphs compiled: 0").
        with torch.compiler.set_stance("force_eager"), sdpa_kernel(backends), FlopCounterMode(display=False) as c:
            step()
        counted = c.get_total_flops()
    for _ in range(args.warmup):
        step()
    graphs_warm = graphs_compiled() if args.compile else 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    waits = getattr(step, "waits", [])
    waits.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    flops = sum(parts.values()) if parts else counted

    n_params = sum(p.numel() for p in module.parameters())
    what = f"DiT-{args.dit_model}" if args.what in ("dit", "sample") else f"preset {cfg.preset}"
    print(f"{args.what} | {what} | device {torch.cuda.get_device_name() if cuda else 'cpu'} | amp {cfg.run.amp} | "
          f"compile {args.compile} | lpips {args.lpips} | params {n_params / 1e6:.1f}M")
    if args.what == "stage1":
        d = cfg.data
        print(f"batch B={d.batch_size} B_ssl={d.ssl_batch_size} B_rec={d.rec_batch_size} local crops "
              f"{d.num_local_crops}x{data.local_crop_size(cfg)}px | image {cfg.encoder.image_size}px")
        for k, v in parts.items():
            print(f"  {k:24s} {v / 1e12:9.3f} TFLOP  {100 * v / flops:5.1f}%")
        print(f"  {'total (written out)':24s} {flops / 1e12:9.3f} TFLOP | torch.utils.flop_counter: "
              f"{counted / 1e12:.3f} TFLOP (ratio {flops / max(counted, 1):.3f})")
    elif args.what == "sample":
        print(f"batch {n_img} | {args.sample_steps} Euler steps + decode | " +
              " | ".join(f"{k} {v / 1e12:.1f} TFLOP" for k, v in parts.items()))
    else:
        print(f"batch {n_img}")
    print(f"{dt * 1000:.1f} ms/step | {n_img / dt:.1f} img/s | {flops / 1e12:.3f} TFLOP/step")
    if waits:
        wait = sum(waits) / len(waits)
        print(f"data loader ({cfg.data.dataset}, {cfg.data.num_workers} workers): {1000 * wait:.1f} ms/step waiting "
              f"for the next batch, {100 * wait / dt:.0f}% of the step time")
    if cuda:
        mfu = flops / dt / (args.peak_tflops * 1e12)
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | MFU {100 * mfu:.1f}% "
              f"(of {args.peak_tflops:.0f} TFLOP/s)")
    else:
        import resource
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (CPU)")
    if args.compile:
        print(f"graphs compiled: {graphs_warm} in warm-up, {graphs_compiled() - graphs_warm} more in the timed steps")
    if args.check and cuda:
        syncs = count_syncs(step)
        print(f"host syncs in 2 steps: {sum(syncs.values())}" + "".join(f"\n  {k}: {v}" for k, v in syncs.items()))
        lines, attn, ms = kernel_table(step)
        print(f"CUDA kernels of one step ({ms:.1f} ms of kernel time):\n" + "\n".join(lines))
        print("attention kernels: " + (", ".join(attn) if attn else "none named flash/efficient/attention"))


if __name__ == "__main__":
    run_cli(main)
