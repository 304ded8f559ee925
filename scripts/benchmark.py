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
    python scripts/benchmark.py --memory [--preset=S] [--run.device=cpu]
                                                      # memory model: peak GPU memory of stage 1 and 2 of S, B, L

What one step is:
  stage1  one pre-training step: teacher forward, student forward (CLIP + SSL + reconstruction), backward, AdamW, EMA
  stage2  one decoder GAN step: frozen encoder, decoder forward/backward, discriminator step (GAN on from step 0)
  dit     one flow-matching step of the DiT (forward, backward, AdamW, EMA) on (latent_dim, S/p, S/p) latents
  sample  one batch of --sample_steps Euler steps with the DiT, then the pixel decoder (img/s = batch / time)
  fid     one batch of 256 px images through the FID Inception network (random weights: timing only)

Reports ms/step, img/s, peak memory, with --compile the compile time (the warm-up steps' time minus as many
steady-state steps), and, on CUDA, model FLOPs utilization (MFU): model FLOPs of one step divided by the step time
and by the GPU's dense bf16 peak (--peak_tflops, 989 for an H100 SXM). For stage 1 the FLOPs are written out part by
part (`stage1_flops`: every matmul of every pass, backward = 2x forward) and printed next to the count of
torch.utils.flop_counter; the other steps use that counter. Elementwise work, norms and softmaxes are not counted
(the usual MFU convention), so they show up as lost utilization. LPIPS runs with --lpips or where loss.lpips=on
(S/B/L); without the weight files it gets random VGG weights, which cost what the real ones do.

--memory counts instead of timing (`count_step`, below): the peak memory of one stage-1 and one stage-2 training
step per GPU, at the shipped per-GPU batch with train.grad_checkpoint off and on, and the largest batch that stays
below 72 GiB (an 80 GiB card with headroom) and 127 GiB (141 GiB). The count runs on fake tensors on the CPU, so it
needs no GPU; on CUDA the real step's max_memory_allocated is printed next to it.

--check adds three diagnostics on CUDA: host syncs during two steps (torch.cuda.set_sync_debug_mode), graphs
compiled and recompiled after warm-up (--compile), and the CUDA kernels of one step by time, with the attention
kernels (flash / memory-efficient / math) named.
"""

import argparse
import contextlib
import copy
import gc
import io
import os
import sys
import time
import warnings
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import losses  # noqa: E402
from model import (VTP, adamw, amp_setup, compile_blocks, parse_config, run_cli, seeded,  # noqa: E402
                   set_grad_checkpointing, swiglu_hidden)
from pretrain import (Student, Teacher, accumulate_gradients, forward_backward, optimizer_step,  # noqa: E402
                      param_groups, stage2_step)

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
    """
    Random tensors shaped like data.py's pre-training batch on the device (one process; float images, as
    data.batch_to_device leaves them). The iBOT masks are at their largest: int(2 B_ssl mask_prob) global crops with
    int(mask_ratio[1] N) masked patches each, which fills every slot of the loader's padded mask_indices / mask_weight
    (M_max). Built without nonzero(), so the batch can be made of fake tensors (the memory model).
    """
    d, S, p = cfg.data, cfg.encoder.image_size, cfg.encoder.patch_size
    B, Bs, Br = d.batch_size, d.ssl_batch_size, d.rec_batch_size
    s, n = data.local_crop_size(cfg), (S // p) ** 2
    n_crops, cap = data.mask_capacity(2 * Bs, n, d.mask_prob, d.mask_ratio)
    patches = torch.rand(n_crops, n, generator=gen).argsort(dim=1)[:, :cap].sort(dim=1).values  # (n_crops, cap)
    masks = torch.zeros(2 * Bs, n, dtype=torch.bool)
    masks[:n_crops].scatter_(1, patches, True)
    tokens = torch.randint(1, cfg.text.vocab_size - 2, (B, cfg.text.context_length), generator=gen)
    tokens[:, -1] = cfg.text.vocab_size - 1  # end-of-text is the largest id
    batch = {"images": torch.randn(B, 3, S, S, generator=gen), "tokens": tokens,
             "global_crops": torch.randn(2 * Bs, 3, S, S, generator=gen),
             "local_crops": torch.randn(d.num_local_crops * Bs, 3, s, s, generator=gen),
             "masks": masks, "mask_indices": (torch.arange(n_crops)[:, None] * n + patches).flatten(),  # (M_max,)
             "mask_weight": torch.full((n_crops * cap,), 1.0 / max(cap, 1)),  # (M_max,): each masked crop weighs 1
             "rec_images": torch.randn(Br, 3, S, S, generator=gen)}
    return {k: v.to(device) for k, v in batch.items()}


def random_lpips(rec_loss, device, args):
    """Give a ReconstructionLoss an LPIPS with random weights (same cost as the real one)."""
    rec_loss.lpips = build(losses.LPIPS, device, args).eval().requires_grad_(False)


def lpips_without_files(cfg, args):
    """
    Whether the step needs an LPIPS with random weights: --lpips, or loss.lpips=on (S/B/L: the paper's L_rec) without
    the weight files. Then the config builds the loss without them (loss.lpips=off) and the caller attaches the
    random LPIPS, which costs what the real one does.
    """
    lc = cfg.loss
    wanted = lc.lpips_weight > 0 and (args.lpips or lc.lpips == "on")
    if not wanted or (lc.lpips_vgg_path and lc.lpips_lin_path):
        return False
    lc.lpips = "off"
    return True


def step_args(**overrides):
    """The options the step builders read, at main()'s defaults (what tests and the memory model pass)."""
    args = argparse.Namespace(compile=False, lpips=False, batch=0, dit_model="B", sample_steps=250, real_data=False,
                              fused_adamw=False, diagnostics=False, meta_init=False)
    return argparse.Namespace(**{**vars(args), **overrides})


def build(make, device, args):
    """make() -> a module, on `device`. args.meta_init: built on the meta device (no initialization) and then given
    empty storage (`place`): the memory model's fake tensors cannot run trunc_normal_'s rejection loop."""
    if not args.meta_init:
        return make().to(device)
    with torch.device("meta"):
        return place(make(), device, args)


def place(module, device, args):
    """module.to(device); args.meta_init: every parameter and buffer replaced by an empty tensor of its shape and
    dtype on `device` (in the memory model, a fake tensor of its FakeTensorMode, which a deepcopy does not keep)."""
    if not args.meta_init:
        return module.to(device)
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                         p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return module


def optimizer(params, device, args, **kwargs):
    """model.adamw; with args.fused_adamw the fused kernel on any device (the memory model's fake CPU tensors stand
    for CUDA ones, where adamw picks it)."""
    return torch.optim.AdamW(params, fused=True, **kwargs) if args.fused_adamw else adamw(params, device, **kwargs)


# -----------------------------------------------------------------------------
# The steps: each builder returns (step function, images per step, FLOPs by part or None, modules to report)


def build_stage1(cfg, args, device):
    random_weights = lpips_without_files(cfg, args)
    with seeded(0):  # train.grad_checkpoint: the student's block stacks recompute in the backward
        student = build(lambda: Student(cfg), device, args)
    if random_weights:
        random_lpips(student.rec_loss, device, args)
    teacher = place(Teacher(student), device, args)
    opt = optimizer(param_groups(student, 0.05), device, args, lr=1e-4, betas=cfg.optim.betas, eps=cfg.optim.eps)
    if args.compile:  # regional compilation, as pretrain.py: every transformer block compiled in place
        compile_blocks(student, cfg.run.compile_backend)
        compile_blocks(teacher, cfg.run.compile_backend)
    autocast, scaler = amp_setup(cfg.run.amp, device)
    k = cfg.train.accum_steps  # > 1: k micro-batches per step through accumulate_gradients (cached CLIP gradients)
    batches = [synthetic_batch(cfg, device, torch.Generator().manual_seed(j)) for j in range(k)]
    loader = data.build_pretrain_loader(cfg, data.build_tokenizer(cfg)) if args.real_data else None
    waits = []  # --real_data: seconds the step waited for its batch

    def step():
        bs = batches
        if loader is not None:  # the real loader (data.num_workers workers): time the wait for the next batch
            t0 = time.perf_counter()
            bs = [data.batch_to_device(next(loader), device) for _ in range(k)]
            waits.append(time.perf_counter() - t0)
        if k == 1:
            forward_backward(student, teacher, bs[0], 0.07, cfg, autocast, scaler, diagnostics=args.diagnostics)
        else:
            accumulate_gradients(student, student, teacher, bs, 0.07, cfg, autocast, scaler, lambda j: None, device,
                                 diagnostics=args.diagnostics)
        optimizer_step(student, teacher, opt, scaler, cfg, 0.999)

    step.waits, step.optimizers = waits, [opt]
    # model FLOPs: the useful work of k micro-batches (gradient caching's extra CLIP forward is not counted)
    parts = {name: k * f for name, f in stage1_flops(cfg, batches[0]["mask_indices"].numel()).items()}
    return step, k * cfg.data.batch_size, parts, student


def build_stage2(cfg, args, device):
    """Stage 2 at --batch, else train.stage2_batch_size, else data.batch_size images."""
    cfg.loss.gan_start = 0  # the discriminator runs every step
    lc = cfg.loss
    random_weights = lpips_without_files(cfg, args)
    with seeded(0):
        vtp = build(lambda: VTP(cfg), device, args).requires_grad_(False).eval()
        disc = build(lambda: losses.PatchDiscriminator(3, lc.disc_channels, lc.disc_layers), device, args)
    decoder = vtp.pixel_decoder.requires_grad_(True).train()
    set_grad_checkpointing(decoder, cfg.train.grad_checkpoint)  # as pretrain.py's stage 2
    rec_loss = place(losses.ReconstructionLoss(lc.l1_weight, lc.lpips_weight, lc.lpips_vgg_path, lc.lpips_lin_path,
                                               lc.lpips), device, args)
    if random_weights:
        random_lpips(rec_loss, device, args)
    opt_g = optimizer(decoder.parameters(), device, args, lr=1e-4, weight_decay=0.0)
    opt_d = optimizer(disc.parameters(), device, args, lr=1e-4, weight_decay=0.0)
    autocast, scaler = amp_setup(cfg.run.amp, device)
    if args.compile:
        compile_blocks(decoder, cfg.run.compile_backend)
    B, S = args.batch or cfg.train.stage2_batch_size or cfg.data.batch_size, cfg.encoder.image_size
    x = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        stage2_step(vtp, decoder, disc, rec_loss, opt_g, opt_d, scaler, [x], 0, cfg, autocast)

    step.optimizers = [opt_g, opt_d]
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
# Memory model: the peak GPU memory of a training step, counted on the CPU.
#
# torch.cuda.max_memory_allocated() is the largest total, over the step, of the bytes of the live tensors, each
# rounded up to the caching allocator's 512-byte blocks. MemoryCounter keeps that total op by op on fake tensors
# (FakeTensorMode: shapes, dtypes and storages without memory or compute), so a full-size S/B/L step is counted in
# seconds on a CPU: weights, teacher, AdamW moments, gradients, everything autograd saves for the backward (what
# activation checkpointing leaves of it, and its recomputation), and every transient (the DINO head's (tokens, K)
# fp32 logits, softmaxes and their gradients, CLIP's logits), in the order the step makes and frees them. Not seen:
# library workspaces (cuBLAS, cuDNN: tens of MiB), the CUDA context and the allocator's fragmentation (neither is in
# max_memory_allocated); the limits leave headroom below the card for them. Checked against the README's H100 table:
# for the code it was measured with (62332da) this counts 43.4 GiB for VTP-S stage 1 at B 256, 40.6 for VTP-B at
# B 128 and 35.5 for VTP-B stage 2 at 64 with LPIPS, where max_memory_allocated gave 44.7, 40.7 and 35.6.

GiB = 2 ** 30
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes
LIMITS_GIB = (72, 127)  # an 80 GiB card (H100) and a 141 GiB one (H200), with headroom
MEMORY_PRESETS = ("S", "B", "L")
# Where CUDA's bf16 autocast and the CPU's differ for the ops of these steps (PyTorch's AMP op reference, "CUDA ops
# that can autocast to float32"): on CUDA these run on an fp32 copy of their bf16 inputs (the LayerNorms of the pixel
# decoder and the text tower, GroupNorm, pow, exp, ...); the CPU leaves them in bf16.
AUTOCAST_FP32_OPS = ("layer_norm", "native_layer_norm", "group_norm", "exp", "expm1", "log", "log1p", "log2", "log10",
                     "rsqrt", "reciprocal", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
                     "logsumexp", "erfinv", "acos", "asin", "cosh", "sinh", "tan", "renorm", "dist")
# ... and these read their bf16 input as it is and write an fp32 result (CUDA's autocast sets their dtype argument)
AUTOCAST_FP32_RESULT_OPS = ("softmax.int", "log_softmax.int", "sum.default", "sum.dim_IntList", "cumsum.default",
                            "cumprod.default", "linalg_vector_norm.default")


def cuda_bytes(storage):
    """Bytes the CUDA caching allocator hands out for a storage: its size rounded up to CUDA_BLOCK."""
    return -(-storage.nbytes() // CUDA_BLOCK) * CUDA_BLOCK


class MemoryCounter(TorchDispatchMode):
    """
    The bytes of the live tensor storages, kept op by op: each op's new output storages are added (`cuda_bytes`)
    and each is subtracted when its last reference dies (a finalizer on the storage). Views and in-place results
    share a storage and count once. `peak` is the largest total since `reset_peak()`, `peak_at` the op (or, in the
    backward, the autograd node) that reached it, `largest` the biggest single storage as (bytes, op). Enter it inside
    a FakeTensorMode to count without allocating; it counts real tensors the same way.
    """

    def __init__(self):
        super().__init__()
        self.sizes = {}  # id(storage) -> counted bytes, for every live storage
        self.live = 0
        self.reset_peak()

    def reset_peak(self):
        self.peak, self.peak_at, self.largest = self.live, "", (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t, func)
        return out

    def add(self, t, op=""):
        if t.device.type == "meta":  # no memory (modules built on the meta device, see `build`)
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.sizes:
            return
        n = cuda_bytes(storage)
        self.sizes[key] = n
        weakref.finalize(storage, self._free, key)
        self.live += n
        node = torch._C._current_autograd_node()  # the backward node being run, or None in the forward
        where = node.name() if node is not None else str(op)
        if n > self.largest[0]:
            self.largest = (n, where)
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, where

    def _free(self, key):
        self.live -= self.sizes.pop(key)


class SavedCounter:
    """
    Inside `with`: the bytes (`bytes`) of the distinct storages autograd saves for the backward (saved_tensors_hooks,
    which also see the block inputs that activation checkpointing keeps), leaving out the storage ids in `exclude`
    (what existed before: weights, the batch).
    """

    def __init__(self, exclude=()):
        self.exclude, self.seen, self.bytes = set(exclude), set(), 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes += cuda_bytes(storage)
            weakref.finalize(storage, self.seen.discard, key)  # a later storage may reuse the id
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def _cast_fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x


def _autocast_kernel(op, fp32_result):
    """An AutocastCPU kernel for `op` with CUDA's policy: an fp32 copy of every low-precision input, or (fp32_result)
    the inputs as they are and dtype=float32 when the first one is a floating tensor and no dtype was given."""
    no_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    names = [a.name for a in op._schema.arguments]
    dtype_at = names.index("dtype") if "dtype" in names else None

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(no_autocast):
            if not fp32_result:
                return op(*tree_map(_cast_fp32, args), **tree_map(_cast_fp32, kwargs))
            first = args[0]
            if first.is_floating_point() and first.dtype != torch.float64:
                if dtype_at is not None and dtype_at < len(args):
                    if args[dtype_at] is None:
                        args = args[:dtype_at] + (torch.float32,) + args[dtype_at + 1:]
                elif kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_ops():
    """Within: CPU autocast casts AUTOCAST_FP32_OPS and AUTOCAST_FP32_RESULT_OPS as CUDA's does (Python kernels on
    the AutocastCPU dispatch key, removed on exit), so a bf16 step on the CPU makes CUDA's tensors."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for names, fp32_result in ((AUTOCAST_FP32_OPS, False), (AUTOCAST_FP32_RESULT_OPS, True)):
            for entry in names:
                name, _, overload = entry.partition(".")
                op = getattr(getattr(torch.ops.aten, name), overload or "default")
                qualified = name + (f".{op._overloadname}" if op._overloadname != "default" else "")
                if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{qualified}", "AutocastCPU"):
                    lib.impl(qualified, _autocast_kernel(op, fp32_result), "AutocastCPU")
        yield
    finally:
        lib._destroy()


def ddp_buckets(module):
    """
    What DDP(module, gradient_as_bucket_view=True) (pretrain.py, more than one GPU) adds to a step: one persistent
    fp32 buffer for every trainable gradient, which each gradient is moved into once accumulated. Emulated with
    post-accumulate hooks; returns the buffer (keep a reference).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
    offset = 0
    for p in params:
        slot = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()

        def into_bucket(param, slot=slot):
            slot.copy_(param.grad)
            param.grad = slot

        p.register_post_accumulate_grad_hook(into_bucket)
    return flat


def create_moments(optimizers):
    """Give every parameter of `optimizers` its AdamW state (what a first step leaves), without a step's forward."""
    for opt in optimizers:
        params = [p for group in opt.param_groups for p in group["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def count_step(cfg, stage, ddp=False, fake=True):
    """
    One stage-1 or stage-2 training step at cfg's per-GPU batch, counted on fake tensors under CUDA's bf16 autocast
    with fused AdamW, train.grad_checkpoint as cfg has it: a log step (the SSL entropies too) after AdamW's moments
    exist, the steady state the benchmark's max_memory_allocated sees after warm-up. ddp: with DDP's gradient
    buckets (a run on more than one GPU). Returns {"peak", "resident" (weights, teacher, AdamW moments, batch,
    buckets: what lives before the step), "saved" (activations autograd saves, checkpointed block inputs included),
    "largest" (the biggest single tensor)} in bytes, and "peak_at" / "largest_at": the op or backward node of each.
    fake=False runs the step on real CPU tensors instead (small configs: the check that fake tensors count the same).
    """
    cfg = copy.deepcopy(cfg)
    cfg.run.amp = "bf16"
    args = step_args(fused_adamw=True, diagnostics=True, meta_init=fake)
    counter = MemoryCounter()
    tensors = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), tensors, cuda_autocast_ops(), counter:
        warnings.simplefilter("ignore")  # FakeTensor's data_ptr deprecation, from deepcopy (the teacher)
        step, _, _, module = BUILDERS[f"stage{stage}"](cfg, args, torch.device("cpu"))
        buckets = ddp_buckets(module) if ddp else None  # noqa: F841 (alive for the whole count)
        create_moments(step.optimizers)
        resident = counter.live
        counter.reset_peak()
        with SavedCounter(exclude=counter.sizes) as saved:
            step()
    return {"peak": counter.peak, "resident": resident, "saved": saved.bytes, "largest": counter.largest[0],
            "peak_at": counter.peak_at, "largest_at": counter.largest[1]}


def with_batch(cfg, stage, unit):
    """A copy of cfg with the per-GPU batch of `stage` at `unit`: stage 1 B, B_ssl, B_rec = 8u, 2u, u (the presets'
    4 : 1 : 0.5), stage 2 train.stage2_batch_size = 8u."""
    cfg = copy.deepcopy(cfg)
    if stage == 1:
        cfg.data.batch_size, cfg.data.ssl_batch_size, cfg.data.rec_batch_size = 8 * unit, 2 * unit, unit
    else:
        cfg.train.stage2_batch_size = 8 * unit
    return cfg


def shipped_batch(cfg, stage):
    """The per-GPU batch the config ships: (B, B_ssl, B_rec) for stage 1, (images,) for stage 2."""
    d = cfg.data
    return (d.batch_size, d.ssl_batch_size, d.rec_batch_size) if stage == 1 else \
        (cfg.train.stage2_batch_size or d.batch_size,)


def max_batch(cfg, stage, limits_gib=LIMITS_GIB, ddp=True, known=None):
    """
    {limit: the largest per-GPU batch (stage 1: B at B : B_ssl : B_rec = 4 : 1 : 0.5; stage 2: images; a multiple of
    8) whose counted peak stays below limit GiB}, 0 where not even 8 fits. The peak is close to linear in the batch,
    so a secant through the two counts closest to the limit guesses the answer and counts narrow the bracket around
    it (about two counts per limit). known: {unit: peak} already counted (with_batch's units).
    """
    peaks = dict(known or {})

    def peak(u):
        if u not in peaks:
            peaks[u] = count_step(with_batch(cfg, stage, u), stage, ddp)["peak"]
        return peaks[u]

    def guess(cap):
        (ua, pa), (ub, pb) = sorted(peaks.items(), key=lambda kv: abs(kv[1] - cap))[:2]
        slope = (pb - pa) / (ub - ua)
        return max(1, int(ua + (cap - pa) / slope)) if slope > 0 else ua + 1

    u0 = max(1, shipped_batch(cfg, stage)[0] // 8)
    peak(u0), peak(u0 // 2 if u0 >= 2 else 2)
    found = {}
    for limit in limits_gib:
        cap = limit * GiB
        fits = max((u for u, p in peaks.items() if p < cap), default=0)  # the largest unit known to fit ...
        too_big = min((u for u, p in peaks.items() if p >= cap), default=None)  # ... the smallest known not to
        while too_big is None or too_big - fits > 1:
            u = max(guess(cap), fits + 1)
            u = u if too_big is None else min(u, too_big - 1)
            if peak(u) < cap:
                fits = u
            else:
                too_big = u
        found[limit] = 8 * fits
    return found


def measure_step(cfg, stage):
    """CUDA: torch.cuda.max_memory_allocated() of a real step (the third: warm-up as in the benchmark), a log step
    like count_step's; -1 when it runs out of memory."""
    device = torch.device("cuda")
    cfg = copy.deepcopy(cfg)
    cfg.run.amp = "bf16"
    step = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            step, _, _, _ = BUILDERS[f"stage{stage}"](cfg, step_args(diagnostics=True), device)
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        return -1
    finally:
        del step
        gc.collect()
        torch.cuda.empty_cache()


def memory_rows(cfg, stage, search=True, measure=False):
    """
    The memory table's rows for one preset and stage, train.grad_checkpoint off and on: the counted step at the
    shipped per-GPU batch on one GPU and with DDP's buckets, the largest batch below each of LIMITS_GIB (with DDP;
    search) and, measure (CUDA), torch.cuda.max_memory_allocated() of the real step next to the count.
    """
    rows = []
    for ckpt in (False, True):
        c = copy.deepcopy(cfg)
        c.train.grad_checkpoint = ckpt
        row = {"preset": c.preset, "stage": stage, "batch": shipped_batch(c, stage), "grad_checkpoint": ckpt,
               **count_step(c, stage), "peak_ddp": count_step(c, stage, ddp=True)["peak"], "max_batch": {},
               "measured": measure_step(c, stage) if measure else None}
        if search:
            b = row["batch"]
            in_units = b[0] % 8 == 0 and (stage == 2 or b == (b[0], b[0] // 4, b[0] // 8))
            row["max_batch"] = max_batch(c, stage, known={b[0] // 8: row["peak_ddp"]} if in_units else None)
        rows.append(row)
    return rows


def print_memory_rows(rows, header=False):
    """Print rows of memory_rows (GiB), with the table's header line first if `header`."""
    def gib(n):
        return f"{n / GiB:.1f}"

    if header:
        print("preset | stage | per-GPU batch | grad ckpt | resident | saved | largest | peak 1 GPU | peak DDP | "
              "CUDA measured | " + " | ".join(f"max batch < {lim} GiB" for lim in LIMITS_GIB) + " | peak at")
    for r in rows:
        measured = "-" if r["measured"] is None else ("OOM" if r["measured"] < 0 else gib(r["measured"]))
        found = " | ".join(f"{r['max_batch'].get(lim, '-'):>19}" for lim in LIMITS_GIB)
        print(f"{r['preset']:>6} | {r['stage']:>5} | {'/'.join(map(str, r['batch'])):>13} | "
              f"{'on' if r['grad_checkpoint'] else 'off':>9} | {gib(r['resident']):>8} | {gib(r['saved']):>5} | "
              f"{gib(r['largest']):>7} | {gib(r['peak']):>10} | {gib(r['peak_ddp']):>8} | {measured:>13} | "
              f"{found} | {r['peak_at']}", flush=True)


PAPER_BATCH = (16384, 4096, 2048)  # the paper's global CLIP / SSL / reconstruction batch
PAPER_GPUS = (8, 32, 128)


def paper_batch_rows(presets=MEMORY_PRESETS, gpus=PAPER_GPUS, rest=()):
    """
    How each preset reaches the paper's batch on W GPUs: 16384/W pairs per GPU (B_ssl, B_rec a quarter and an eighth)
    as k micro-batches of at most the shipped data.batch_size (train.accum_steps=k: the fewest that divide evenly and
    whose step the memory model with DDP counts below LIMITS_GIB[0]), with that peak. The count holds all k synthetic
    micro-batches on the GPU (the training loop moves one at a time), so it overstates the loop by k-1 micro-batches
    of images.
    """
    rows = []
    for preset in presets:
        for w in gpus:
            per_gpu = PAPER_BATCH[0] // w
            for k in range(1, per_gpu // 8 + 1):
                cfg = parse_config([f"--preset={preset}", *rest])
                b = per_gpu // k
                if per_gpu % (8 * k) or b > cfg.data.batch_size:
                    continue
                cfg.data.batch_size, cfg.data.ssl_batch_size, cfg.data.rec_batch_size = b, b // 4, b // 8
                cfg.train.accum_steps = k
                peak = count_step(cfg, 1, ddp=True)["peak"]
                if peak < LIMITS_GIB[0] * 2 ** 30:
                    break
            rows.append({"preset": preset, "gpus": w, "per_gpu": per_gpu, "micro": b, "accum_steps": k,
                         "peak_ddp": peak})
            r = rows[-1]
            print(f"| {preset} | {w} | {per_gpu} / {per_gpu // 4} / {per_gpu // 8} | {b} / {b // 4} / {b // 8} | {k} "
                  f"| {r['peak_ddp'] / 2 ** 30:.1f} |", flush=True)
    return rows


def memory_main(args, rest):
    """--memory: the table for --preset (or S, B and L), stage 1 and 2, grad checkpointing off and on."""
    presets = [None] if any(a.startswith("--preset") for a in rest) else MEMORY_PRESETS
    if args.paper_batch:
        print("the paper's 16384 / 4096 / 2048 on W GPUs: per-GPU batch, micro-batch and train.accum_steps, and the "
              "memory model's peak of the accumulated stage-1 step with DDP (GiB)\n| preset | GPUs | per GPU (B / "
              "B_ssl / B_rec) | micro-batch | accum_steps | peak GiB |\n|---|---|---|---|---|---|")
        chosen = MEMORY_PRESETS if presets == MEMORY_PRESETS else [parse_config(rest).preset]
        gpus = tuple(int(w) for w in args.gpus.split(","))
        return paper_batch_rows(chosen, gpus, rest=[a for a in rest if not a.startswith("--preset")])
    cuda = torch.cuda.is_available() and parse_config(rest).run.device != "cpu"
    print(f"memory model: one training step per GPU, counted on fake tensors under CUDA's bf16 autocast, fused "
          f"AdamW, a log step (SSL entropies), LPIPS as loss.lpips says (S/B/L: on, random weights without the "
          f"files); 'peak DDP' adds DDP's gradient buckets (more than one GPU) and sets the max batches (stage 1: "
          f"B with B_ssl = B/4, B_rec = B/8). {'CUDA measured: max_memory_allocated of the real step.' if cuda else ''}"
          f"\nresident = weights, teacher, AdamW moments and batch before the step; saved = what autograd keeps for "
          f"the backward; largest = the biggest single tensor; GiB throughout")
    header = True
    for preset in presets:
        cfg = parse_config(rest if preset is None else [f"--preset={preset}"] + rest)
        for stage in (1, 2):
            print_memory_rows(memory_rows(cfg, stage, search=not args.no_search, measure=cuda), header)
            header = False


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="stage1", choices=tuple(BUILDERS), help="which step to time")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (compilation happens here)")
    ap.add_argument("--batch", type=int, default=0, help="batch of stage2/dit/sample/fid (0 = a default)")
    ap.add_argument("--dit_model", default="B", help="DiT size for --what=dit/sample (tiny, S, B, L, XL)")
    ap.add_argument("--sample_steps", type=int, default=250, help="Euler steps for --what=sample")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="GPU dense bf16 peak, for MFU")
    ap.add_argument("--compile", action="store_true",
                    help="stage 1 and 2: compile every transformer block in place (model.compile_blocks, as "
                         "pretrain.py's run.compile, backend run.compile_backend); dit/sample: torch.compile the DiT")
    ap.add_argument("--lpips", action="store_true", help="include LPIPS (random VGG weights) in the reconstruction")
    ap.add_argument("--check", action="store_true", help="CUDA: count host syncs and recompiles, list kernels")
    ap.add_argument("--real_data", action="store_true",
                    help="stage1: batches from the configured data (--data.*) instead of synthetic ones, and the "
                         "loader's share of the step time")
    ap.add_argument("--memory", action="store_true",
                    help="the memory model instead of a timing: peak memory of a stage-1 and a stage-2 step of "
                         "--preset (default: S, B and L) at the shipped per-GPU batch, grad checkpointing off and "
                         "on, and the largest batch below 72 / 127 GiB; counted on the CPU, measured too on CUDA "
                         "(unless --run.device=cpu)")
    ap.add_argument("--no_search", action="store_true", help="--memory: skip the largest-batch search")
    ap.add_argument("--paper_batch", action="store_true",
                    help="--memory: the paper's 16k / 4k / 2k batch on --gpus GPUs by gradient accumulation")
    ap.add_argument("--gpus", default="8,32,128", help="--memory --paper_batch: numbers of GPUs")
    ap.set_defaults(fused_adamw=False, diagnostics=False, meta_init=False)  # the builders' options for count_step
    args, rest = ap.parse_known_args(argv)
    if args.memory:
        return memory_main(args, rest)
    cfg = parse_config(rest)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")
    cuda = device.type == "cuda"
    lpips = args.what in ("stage1", "stage2") and cfg.loss.lpips_weight > 0 and (args.lpips or cfg.loss.lpips == "on")
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
    warm = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    warm = time.perf_counter() - warm  # with --compile: compilation + warmup x the steady-state step
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
          f"compile {args.compile} | lpips {lpips} | params {n_params / 1e6:.1f}M")
    if args.what == "stage1":
        d = cfg.data
        k = cfg.train.accum_steps  # the counter also sees gradient caching's extra CLIP forward (not model FLOPs)
        print(f"batch B={d.batch_size} B_ssl={d.ssl_batch_size} B_rec={d.rec_batch_size} local crops "
              f"{d.num_local_crops}x{data.local_crop_size(cfg)}px | image {cfg.encoder.image_size}px"
              + (f" | {k} micro-batches per step (train.accum_steps)" if k > 1 else ""))
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
        if args.warmup:
            print(f"compile time {warm - args.warmup * dt:.1f} s (warm-up: {args.warmup} step(s) in {warm:.1f} s, "
                  f"minus {args.warmup} x {dt * 1000:.1f} ms at the steady state)")
        else:
            print("compile time: not measured (--warmup=0 compiles in the timed steps)")
    if args.check and cuda:
        syncs = count_syncs(step)
        print(f"host syncs in 2 steps: {sum(syncs.values())}" + "".join(f"\n  {k}: {v}" for k, v in syncs.items()))
        lines, attn, ms = kernel_table(step)
        print(f"CUDA kernels of one step ({ms:.1f} ms of kernel time):\n" + "\n".join(lines))
        print("attention kernels: " + (", ".join(attn) if attn else "none named flash/efficient/attention"))


if __name__ == "__main__":
    run_cli(main)
