"""
VTP pre-training (the README's Method §1, §5, §6).

Stage 1 (default): one ViT encoder trained from scratch with CLIP + SSL (DINO + iBOT + KoLeo against an EMA teacher)
+ reconstruction through the bottleneck and the pixel decoder, one optimizer step on the weighted sum.
Stage 2 (--train.stage=2): the encoder and bottleneck are frozen and the pixel decoder is fine-tuned with
L1 + LPIPS + an adaptive hinge GAN.

    python pretrain.py                                   # tiny preset, built-in data, CPU, a few minutes
    python pretrain.py --train.stage=2                   # stage 2 on the latest stage-1 checkpoint in out_dir
    torchrun --nproc_per_node=8 pretrain.py --preset=L --data.dataset=tar --data.path='shards/{00000..01023}.tar' \
        --text.tokenizer=bpe_simple_vocab_16e6.txt.gz --loss.lpips_vgg_path=vgg16.pth --loss.lpips_lin_path=vgg.pth

Any λ can be 0 for the paper's ablations: --loss.lambda_clip=0 --loss.lambda_ssl=0 is the reconstruction-only AE.
"""

import contextlib
import copy
import gc
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import losses
from model import (VTP, Config, ConfigError, DINOHead, Tracker, adamw, all_gather_object, all_reduce_sum, amp_setup,
                   cleanup_distributed, compile_blocks, config_summary, ema_update, export_official, load_checkpoint,
                   official_config, parse_config, print0, run_cli, save_checkpoint, seeded, set_grad_checkpointing,
                   setup_distributed, step_generator, trim_metrics)

# -----------------------------------------------------------------------------
# Schedules: pure functions of the step (Method §5-6)


def lr_at(step, cfg: Config, peak):
    """1) linear warm-up over warmup_frac of the steps, 2) cosine decay to min_lr_frac * peak."""
    warmup = max(1, int(cfg.optim.warmup_frac * cfg.train.max_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.train.max_steps - warmup)
    floor = cfg.optim.min_lr_frac * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def teacher_momentum_at(step, cfg: Config):
    """Cosine from teacher_momentum (0.992) at step 0 to teacher_momentum_final (1.0) at the last step."""
    base, final = cfg.optim.teacher_momentum, cfg.optim.teacher_momentum_final
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * step / cfg.train.max_steps))


def teacher_temp_at(step, cfg: Config):
    """1) linear warm-up 0.04 -> 0.07 over the first 30% of steps, 2) constant after."""
    lc = cfg.loss
    warmup = lc.teacher_temp_warmup_frac * cfg.train.max_steps
    if step >= warmup:
        return lc.teacher_temp
    return lc.warmup_teacher_temp + (lc.teacher_temp - lc.warmup_teacher_temp) * step / warmup


def peak_lr(cfg: Config, world_size):
    """Peak lr scaled by sqrt(global CLIP batch / lr_ref_batch) (Method §6)."""
    global_batch = cfg.data.batch_size * world_size * cfg.train.accum_steps
    return cfg.optim.lr * math.sqrt(global_batch / cfg.optim.lr_ref_batch)


# -----------------------------------------------------------------------------
# The student: everything DDP must synchronize, with one forward that computes every stage-1 loss.


class Student(nn.Module):
    """
    The trained VTP plus the DINO head. `forward(batch, teacher_probs)` runs one encoder forward per objective
    (CLIP on the B pairs, SSL on the B_ssl multi-crops, reconstruction on B_rec images) and returns
    (vtp_loss dict, reconstructions). Parts whose λ is 0 are frozen, so DDP never sees an unused parameter.
    With train.grad_checkpoint every block stack recomputes its activations in the backward.
    """

    def __init__(self, cfg: Config, rank=0, world_size=1):
        super().__init__()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.vtp = VTP(cfg)
        feat_dim = cfg.encoder.latent_dim if cfg.encoder.latent_features else cfg.encoder.width
        self.dino_head = DINOHead(feat_dim, cfg.head)
        lc = cfg.loss
        self.rec_loss = losses.ReconstructionLoss(lc.l1_weight, lc.lpips_weight, lc.lpips_vgg_path, lc.lpips_lin_path,
                                                  lc.lpips)
        set_grad_checkpointing(self.vtp, cfg.train.grad_checkpoint)
        v = self.vtp
        if lc.lambda_clip == 0:  # AE-only / SSL+AE: no text tower, no CLIP head
            for m in (v.token_embedding, v.text_transformer, v.ln_final, v.visual_proj):
                m.requires_grad_(False)
            for p in (v.positional_embedding, v.text_projection, v.logit_scale):
                p.requires_grad_(False)
        if lc.lambda_ssl == 0:  # AE-only / CLIP+AE: no DINO head, no masked tokens
            self.dino_head.requires_grad_(False)
            v.trunk.mask_token.requires_grad_(False)
        if lc.lambda_rec == 0:
            v.pixel_decoder.requires_grad_(False)
            if not cfg.encoder.latent_features:
                v.trunk.feature_bottleneck.requires_grad_(False)

    def forward(self, batch, teacher_probs=None, generator=None, diagnostics=False, clip_cache=None):
        """`generator`: the step's stochastic-depth draws (model.step_generator), shared by the three forwards.
        diagnostics: also return the SSL entropies (two softmaxes over K per token: only on log steps).
        clip_cache: gradient accumulation (`accumulate_gradients`): {"loss": L_clip of the accumulated batch, "grads":
        its cached gradients w.r.t. this micro-batch's (image, text) embeddings and logit_scale}. "clip" is then that
        loss (constant here) and "cached" a term whose gradient through the towers is the cached one."""
        lc, e, v = self.cfg.loss, self.cfg.encoder, self.vtp
        clip = dino = ibot = koleo = rec = recon = entropies = cached = None
        if lc.lambda_clip > 0:
            img = v.image_features(batch["images"], drop_path_rate=e.drop_path_clip, generator=generator)  # (B, E)
            txt = v.text_features(batch["tokens"])  # (B, E)
            if clip_cache is None:
                clip = losses.clip_loss(img, txt, v.logit_scale, self.rank, self.world_size)
            else:
                clip = clip_cache["loss"]
                cached = losses.cached_gradient_term((img, txt, v.logit_scale), clip_cache["grads"])
        if lc.lambda_ssl > 0:
            dino, ibot, koleo, entropies = self.ssl_losses(batch, teacher_probs, generator, diagnostics)
        if lc.lambda_rec > 0:
            target = batch["rec_images"]  # (B_rec, 3, H, W)
            z = v.encode(target, drop_path_rate=e.drop_path_rec, generator=generator)
            recon = v.decode(z, drop_path_rate=0.0)
            rec = self.rec_loss(recon, target)
        terms = losses.vtp_loss(lc, rec=rec, clip=clip, dino=dino, ibot=ibot, koleo=koleo)
        if cached is not None:
            terms["cached"] = cached
        return {**terms, **(entropies or {})}, recon

    def ssl_losses(self, batch, teacher_probs, generator=None, diagnostics=False):
        """Student on the global crops (iBOT-masked) and the local crops; DINO, iBOT and KoLeo against the teacher.
        Returns (dino, ibot, koleo, entropies or None): the entropies of targets and predictions are the collapse
        monitor."""
        lc, v = self.cfg.loss, self.vtp
        crops, masks = [batch["global_crops"]], [batch["masks"]]
        if batch["local_crops"].numel():
            crops.append(batch["local_crops"])
            masks.append(None)
        feats = v.trunk.forward_features(crops, masks=masks, drop_path_rate=self.cfg.encoder.drop_path_ssl,
                                         generator=generator)
        g_cls, g_patches = v.semantic_tokens(feats[0])  # (2B, D), (2B, N, D)
        n_global = g_cls.shape[0]
        # one head call for the global [CLS], the masked patch tokens and the local [CLS]
        mask_idx, mask_w = batch["mask_indices"], batch["mask_weight"]  # (M,) padded to a fixed M: static shapes
        head_in = [g_cls, g_patches.flatten(0, 1)[mask_idx]]  # (2B, D), (M, D)
        if len(feats) > 1:
            head_in.append(v.semantic_tokens(feats[1])[0])  # (n_local*B, D)
        logits = self.dino_head(torch.cat(head_in))
        s_global, s_patch = logits[:n_global], logits[n_global:n_global + head_in[1].shape[0]]
        s_local = logits[n_global + head_in[1].shape[0]:] if len(feats) > 1 else None
        dino = losses.dino_loss(s_global, s_local, teacher_probs["cls"], lc.student_temp)
        ibot = losses.ibot_loss(s_patch, teacher_probs["patches"], batch["masks"], lc.student_temp, mask_idx, mask_w,
                                n_images=batch.get("ibot_images"))
        koleo = losses.koleo_loss(g_cls, n_crops=2)
        if not diagnostics:
            return dino, ibot, koleo, None
        s_cls = s_global if s_local is None else torch.cat([s_global, s_local])  # (n_crops*B, K)
        entropies = losses.ssl_entropies(teacher_probs["cls"], teacher_probs["patches"], s_cls, s_patch,
                                         lc.student_temp, mask_w)
        return dino, ibot, koleo, entropies


class Teacher(nn.Module):
    """EMA copy of the student's encoder and DINO head (no stochastic depth), run on the unmasked global crops."""

    def __init__(self, student: Student):
        super().__init__()
        self.trunk = copy.deepcopy(student.vtp.trunk)
        self.dino_head = copy.deepcopy(student.dino_head)
        self.latent_features = student.vtp.latent_features
        self.loss_cfg = student.cfg.loss
        self.requires_grad_(False)
        self.eval()
        n_proto = student.cfg.head.num_prototypes
        self.center_cls = losses.TeacherCentering(n_proto, student.cfg.loss.center_momentum)
        self.center_patch = losses.TeacherCentering(n_proto, student.cfg.loss.center_momentum)

    @torch.no_grad()
    def ema_from(self, student, momentum):
        """EMA update of (trunk, head) from the student's (trunk, head) after its optimizer step."""
        ema_update(nn.ModuleList([self.trunk, self.dino_head]),
                   nn.ModuleList([student.vtp.trunk, student.dino_head]), momentum)

    @torch.no_grad()
    def forward(self, global_crops, mask_indices, temp, mask_weight=None):
        """Teacher probabilities {"cls": (2B, K), "patches": (M, K)} for the student's masked positions, given as
        the batch's `mask_indices` (flat indices into the (2B, N) masks, padded to a fixed M; `mask_weight` 0 marks
        the padding, which takes no part in Sinkhorn-Knopp or the centre)."""
        t_cls, t_patch = self.logits(global_crops, mask_indices)
        return self.targets([t_cls], [t_patch], temp, [mask_weight])[0]()

    @torch.no_grad()
    def logits(self, global_crops, mask_indices):
        """The head's logits on the [CLS] (2B, K) and on the masked patch tokens (M, K) of the unmasked crops."""
        f = self.trunk.forward_features(global_crops)
        cls, patches = f["cls"], f["patches"]
        if self.latent_features:
            cls, patches = self.trunk.feature_bottleneck(cls), self.trunk.feature_bottleneck(patches)
        logits = self.dino_head(torch.cat([cls, patches.flatten(0, 1)[mask_indices]]))
        return logits[:cls.shape[0]], logits[cls.shape[0]:]

    @torch.no_grad()
    def targets(self, t_cls, t_patch, temp, mask_weight):
        """Lists of logits, one entry per micro-batch, normalized together: Sinkhorn-Knopp over all of their rows
        (and all processes), or the centre (then updated once from all of them). Returns one function per
        micro-batch giving its {"cls", "patches"} probabilities when called: only the logits are held meanwhile."""
        if self.loss_cfg.teacher_norm == "sinkhorn":
            n_iters = self.loss_cfg.sinkhorn_iters
            cls = losses.SinkhornKnopp(t_cls, temp, n_iters)
            patches = losses.SinkhornKnopp(t_patch, temp, n_iters, mask_weight)
            return [lambda j=j: {"cls": cls.probs(j), "patches": patches.probs(j)} for j in range(len(t_cls))]
        cls = self.center_cls.targets(t_cls, temp)
        patches = self.center_patch.targets(t_patch, temp, mask_weight)
        return [lambda c=c, p=p: {"cls": c(), "patches": p()} for c, p in zip(cls, patches)]


TEXT_TOWER = ("token_embedding", "positional_embedding", "text_transformer", "ln_final", "text_projection")


def param_groups(module, weight_decay, text_lr_mult=1.0):
    """
    AdamW groups: no weight decay on norms, biases, [CLS]/mask tokens and logit_scale (all 0/1-d or *_token); the
    text tower's parameters (`TEXT_TOWER`) get lr * text_lr_mult. Each group carries its "lr_mult".
    Order: image-side decay, image-side no-decay, text decay, text no-decay (empty groups are left out).
    """
    groups = {key: [] for key in ((False, True), (False, False), (True, True), (True, False))}  # (text, decay)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("cls_token", "mask_token")) or "logit_scale" in name
        text = any(part in TEXT_TOWER for part in name.split("."))
        groups[(text, not skip)].append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_mult": text_lr_mult if text else 1.0}
            for (text, decay), ps in groups.items() if ps]


# -----------------------------------------------------------------------------
# Previews and the cross-process parameter check (logging and mixed precision: model.py's runtime layer)


def save_preview(path, images, recon):
    """A PNG with the inputs (top row) above their reconstructions (bottom row)."""
    rows = [data.denormalize(x.float().cpu()).clamp(0, 1) for x in (images, recon)]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 2H, n*W)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


@torch.no_grad()
def check_ranks_in_sync(module, rank, world_size):
    """DDP keeps every process's parameters identical; verify it (one all-gather of a checksum) at checkpoints."""
    if world_size == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
    sums = losses.all_gather_with_grad(checksum, rank, world_size).tolist()  # (world_size,)
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"parameters differ across processes: checksums {sums}")
    print0(f"parameter checksum {sums[0]:.10e} identical on {world_size} processes")


def fixed_preview_images(cfg: Config, n=8):
    """The first n validation images at the training size (training images when there is no validation data:
    data.holdout=0 without data.val_path), for previews that are comparable across steps."""
    d = cfg.data
    split = "val" if d.dataset == "builtin" or d.val_path or d.holdout > 0 else "train"
    batch = next(iter(data.build_eval_loader(cfg, split, cfg.encoder.image_size, n, max_images=n)))
    return batch["images"]


# -----------------------------------------------------------------------------
# Stage 1


def forward_backward(fwd, teacher, batch, temp, cfg: Config, autocast, scaler, generator=None, diagnostics=False):
    """One step's batch (train.accum_steps=1): teacher targets (no grad), the student's losses (stochastic depth
    drawn from `generator`) and the (scaled) backward of their total. Returns the loss terms (with the SSL
    entropies if `diagnostics`)."""
    with autocast():
        probs = (teacher(batch["global_crops"], batch["mask_indices"], temp, batch["mask_weight"])
                 if cfg.loss.lambda_ssl > 0 else None)
        terms, _ = fwd(batch, probs, generator, diagnostics)
    (scaler.scale(terms["total"]) if scaler else terms["total"]).backward()
    return terms


def accumulate_gradients(model, student, teacher, batches, temp, cfg: Config, autocast, scaler, generators, device,
                         diagnostics=False):
    """
    k = len(batches) micro-steps whose gradients add up to the gradient of one step on their union, as if the k
    micro-batches ran on k times as many processes (the README's Method §6, "Batch size and gradient accumulation"):
      1) teacher targets: the teacher's logits of every micro-batch, then Sinkhorn-Knopp or the centre once over all
         of them (`teacher_targets`), so DINO and iBOT are exact; iBOT is averaged over the masked crops of all;
      2) CLIP by gradient caching (Gao et al. 2021): the embeddings of every micro-batch without a graph, the
         InfoNCE loss over all of them (and every process) and its gradient w.r.t. them (`clip_gradient_cache`);
      3) per micro-batch: the student's forward, with the cached CLIP gradient sent through its towers, and the
         backward of its 1/k share of the other terms; DDP all-reduces on the last one.
    KoLeo's nearest neighbours stay within each micro-batch (DINOv2 searches them within each GPU's batch).
    `generators(j)`: a fresh generator for micro-batch j, so the CLIP pass of 2) redraws 3)'s stochastic depth.
    `batches`: loader batches (uint8 images, moved to `device` one at a time). Returns each micro-step's terms.
    """
    k, lc = len(batches), cfg.loss
    probs, cache, ibot_share = [None] * k, [None] * k, None
    if lc.lambda_ssl > 0:
        probs = teacher_targets(teacher, batches, temp, autocast, device)
        masked_crops = sum((b["masks"].sum(dim=1) > 0).sum() for b in batches)  # () tensor: no host sync
        ibot_share = masked_crops.clamp_min(1) / k  # each micro-step's iBOT is divided by its share of them
    if lc.lambda_clip > 0:
        cache = clip_gradient_cache(student, batches, cfg, autocast, generators, device)
    out = []
    for j, batch in enumerate(batches):
        batch = {**data.batch_to_device(batch, device), "ibot_images": ibot_share}
        sync = j == k - 1 or student.world_size == 1  # all-reduce gradients on the last micro-step
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast():
                targets = probs[j]() if probs[j] else None  # this micro-batch's share of the teacher's targets
                terms, _ = model(batch, targets, generators(j), diagnostics, cache[j])
            loss = terms["total"] / k + terms.pop("cached", 0.0)
            (scaler.scale(loss) if scaler else loss).backward()
        out.append(terms)
    return out


@torch.no_grad()
def teacher_targets(teacher, batches, temp, autocast, device):
    """The teacher's targets for every micro-batch of `batches`, normalized together (Sinkhorn-Knopp over all their
    rows, or one centre update from all of them): one function per micro-batch giving its {"cls", "patches"}."""
    t_cls, t_patch, weights = [], [], []
    for batch in batches:
        b = data.batch_to_device({key: batch[key] for key in ("global_crops", "mask_indices", "mask_weight")}, device)
        with autocast():
            c, p = teacher.logits(b["global_crops"], b["mask_indices"])
        t_cls.append(c)
        t_patch.append(p)
        weights.append(b["mask_weight"])
    with autocast():
        return teacher.targets(t_cls, t_patch, temp, weights)


def clip_gradient_cache(student, batches, cfg: Config, autocast, generators, device):
    """
    Gradient caching for CLIP (Gao, Zhang, Han, Callan 2021): 1) the image and text embeddings of every micro-batch
    without a graph (stochastic depth from generators(j), as the student's pass will draw it again); 2) λ_clip·L_clip
    over all of them, gathered across processes as `clip_loss` does, and its gradient w.r.t. the embeddings and
    logit_scale. Returns per micro-batch {"loss": L_clip, "grads": (image, text, logit_scale / k)}, the student's
    `clip_cache`; memory is one micro-batch's towers, at the cost of one more forward of both.
    """
    v, lc = student.vtp, cfg.loss
    img, txt = [], []
    with torch.no_grad():
        for j, batch in enumerate(batches):
            b = data.batch_to_device({"images": batch["images"], "tokens": batch["tokens"]}, device)
            with autocast():
                img.append(v.image_features(b["images"], drop_path_rate=cfg.encoder.drop_path_clip,
                                            generator=generators(j)).float())
                txt.append(v.text_features(b["tokens"]).float())
    all_img, all_txt = torch.cat(img).requires_grad_(), torch.cat(txt).requires_grad_()  # (k*B, E)
    scale = v.logit_scale.detach().clone().requires_grad_()
    loss = losses.clip_loss(all_img, all_txt, scale, student.rank, student.world_size)
    g_img, g_txt, g_scale = torch.autograd.grad(lc.lambda_clip * loss, (all_img, all_txt, scale))
    sizes, k = [x.shape[0] for x in img], len(batches)
    return [{"loss": loss.detach(), "grads": (gi, gt, g_scale / k)}
            for gi, gt in zip(g_img.split(sizes), g_txt.split(sizes))]


def optimizer_step(student, teacher, optimizer, scaler, cfg: Config, momentum, freeze_last_layer=False):
    """Unscale, clip, AdamW step, zero the grads, clamp logit_scale, then the teacher's EMA update.
    freeze_last_layer drops the gradient of the DINO head's prototypes (DINO, DINOv2: `cancel_gradients_last_layer`),
    so AdamW leaves them, and through the EMA the teacher's, untouched. Returns the gradient norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    if freeze_last_layer:
        student.dino_head.last_layer.weight.grad = None
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip or float("inf"))
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        student.vtp.logit_scale.clamp_(0.0, cfg.loss.logit_scale_max)
        if cfg.loss.lambda_ssl > 0:
            teacher.ema_from(student, momentum)
    return grad_norm


def export_if_asked(cfg: Config, vtp, tokenizer_state, rank):
    """--train.export=FOLDER: the trained tokenizer in the released format (config.json + model.safetensors)."""
    if cfg.train.export and rank == 0:
        for line in export_official(vtp, cfg, cfg.train.export, cfg.train.export_dtype, tokenizer_state):
            print0(line)


def restore(ckpt, parts, scaler, loader):
    """A resumed run: every {checkpoint key: module or optimizer} of `parts`, the GradScaler (fp16) and the data
    position from `ckpt` (every rank's, as saved; the loader takes its own, or maps them onto a new layout);
    returns the step to continue from."""
    for key, obj in parts.items():
        obj.load_state_dict(ckpt[key])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt["data"])
    return ckpt["step"]


def save_training_state(cfg: Config, out_dir, step, rank, loader, state):
    """Every rank's data position (one all-gather), then rank 0 writes ckpt_{step}.pt atomically and keeps the newest
    train.keep_ckpts. `state`: a function giving the rest of the checkpoint dict (called on rank 0 only)."""
    positions = all_gather_object(loader.state_dict())  # [rank 0's, rank 1's, ...]
    if rank == 0:
        save_checkpoint(os.path.join(out_dir, f"ckpt_{step:07d}.pt"),
                        {**state(), "step": step, "config": cfg.to_dict(), "data": positions,
                         "world_size": len(positions)}, keep=cfg.train.keep_ckpts)


def note_new_layout(ckpt, cfg: Config, world_size, lr_peak):
    """A resume on another number of processes (a node lost or added): say how the global batch and lr change."""
    old = ckpt.get("world_size", world_size)
    if old != world_size:
        per = cfg.data.batch_size * cfg.train.accum_steps
        print0(f"resuming on {world_size} processes, saved on {old}: global batch {per * old} -> {per * world_size}, "
               f"peak lr {peak_lr(cfg, old):.2e} -> {lr_peak:.2e} (sqrt scaling); the data stream continues where it "
               "stopped")


def train_stage1(cfg: Config, rank, world_size, device):
    out_dir, tc = cfg.train.out_dir, cfg.train

    # 1. data and text tokenizer (a resumed run uses the tokenizer saved in its checkpoint). Rank 0 picks the
    # checkpoint and sends it to every process: nodes need no shared disk.
    ckpt_path, ckpt = load_checkpoint(out_dir) if tc.resume else (None, None)
    if tc.resume and not ckpt:
        print0(f"--train.resume: no ckpt_*.pt in {out_dir}, starting from scratch")
    tokenizer = data.tokenizer_from_state(ckpt["tokenizer"]) if ckpt else data.build_tokenizer(cfg)
    loader = data.build_pretrain_loader(cfg, tokenizer, rank, world_size)

    # 2. student (VTP + DINO head), EMA teacher, AdamW, and the resumed state
    with seeded(cfg.run.seed):  # identical initial weights on every rank (DDP also broadcasts them)
        student = Student(cfg, rank, world_size).to(device)
    teacher = Teacher(student).to(device)
    lr_peak = peak_lr(cfg, world_size)
    optimizer = adamw(param_groups(student, cfg.optim.weight_decay, cfg.optim.text_lr_mult), device, lr=lr_peak,
                      betas=cfg.optim.betas, eps=cfg.optim.eps)
    autocast, scaler = amp_setup(cfg.run.amp, device)
    step = 0
    if ckpt:
        parts = {"model": student.vtp, "dino_head": student.dino_head, "teacher": teacher, "optimizer": optimizer}
        step = restore(ckpt, parts, scaler, loader)
        print0(f"resumed from {ckpt_path} at step {step}")
        note_new_layout(ckpt, cfg, world_size, lr_peak)
        del ckpt, parts  # the mapped file and received tensors are released here
        gc.collect()
    if cfg.run.compile:  # regional: each block compiled in place; `student` stays the module we save and EMA from
        compile_blocks(student, cfg.run.compile_backend)
        compile_blocks(teacher, cfg.run.compile_backend)
    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no second copy of every gradient)
    model = DDP(student, gradient_as_bucket_view=True) if world_size > 1 else student

    def checkpoint(step):
        check_ranks_in_sync(student, rank, world_size)
        save_training_state(cfg, out_dir, step, rank, loader, lambda: {
            "model": student.vtp.state_dict(), "dino_head": student.dino_head.state_dict(),
            "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "stage": 1, "tokenizer": tokenizer.state_dict(),
            "rng": {"seed": cfg.run.seed, "rule": "stochastic depth from generators seeded by (seed, rank, step)"}})

    # 3. logging: metrics.jsonl continues at the resumed step; fixed preview images
    if rank == 0:
        trim_metrics(out_dir, step)
    preview = fixed_preview_images(cfg).to(device) if rank == 0 else None
    print0(f"stage 1 | {world_size} process(es) on {device} | global batch "
           f"{cfg.data.batch_size * world_size * tc.accum_steps} | peak lr {lr_peak:.2e} | "
           f"λ_rec {cfg.loss.lambda_rec} λ_ssl {cfg.loss.lambda_ssl} λ_clip {cfg.loss.lambda_clip}")
    bar = tqdm(total=tc.max_steps, initial=step, desc="stage 1", dynamic_ncols=True) if rank == 0 else None
    tracker = Tracker(world_size, step)
    # the entropies (ent_t_* teacher targets, ent_s_* student predictions) read against log K: both at log K = collapse
    log_k = {"log_k": math.log(cfg.head.num_prototypes)} if cfg.loss.lambda_ssl > 0 else {}
    terms = None
    # 4. training loop
    while step < tc.max_steps:
        # (a) this step's randomness and schedules. Stochastic depth draws from a generator seeded by (seed, rank,
        # step) (micro-step j of k: step*k + j), so a resumed run draws exactly what an uninterrupted one would; the
        # data stream is a function of its position. lr: warm-up then cosine (per group: the text tower's lr_mult);
        # teacher temperature: warm-up.
        lr, temp = lr_at(step, cfg, lr_peak), teacher_temp_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        last = step + 1 == tc.max_steps
        logs = (step + 1) % tc.log_every == 0 or last or (step + 1) % tc.ckpt_every == 0
        # (b) one batch (CLIP images + captions, SSL multi-crop + iBOT masks, reconstruction subset), uint8 images
        # normalized on the device, teacher targets, the three losses (losses.vtp_loss), backward; DDP all-reduces.
        # With train.accum_steps=k, k batches whose gradients add up to that of their union (accumulate_gradients).
        # The SSL entropies are computed on log steps only.
        if tc.accum_steps == 1:
            batch, gen = data.batch_to_device(next(loader), device), step_generator(cfg.run.seed, rank, step, device)
            terms = [forward_backward(model, teacher, batch, temp, cfg, autocast, scaler, gen, diagnostics=logs)]
        else:
            batches = [next(loader) for _ in range(tc.accum_steps)]
            terms = accumulate_gradients(model, student, teacher, batches, temp, cfg, autocast, scaler,
                                         lambda j: step_generator(cfg.run.seed, rank, step * tc.accum_steps + j,
                                                                  device), device, diagnostics=logs)
        for t in terms:
            tracker.add(t, step + 1)  # steps are counted from 1 in logs and checkpoints
        # (c) clip, AdamW (prototypes frozen for the first head.freeze_last_layer_steps), teacher EMA
        grad_norm = optimizer_step(student, teacher, optimizer, scaler, cfg, teacher_momentum_at(step, cfg),
                                   freeze_last_layer=step < cfg.head.freeze_last_layer_steps)
        tracker.add({"grad_norm": grad_norm}, step + 1)
        step += 1
        if bar is not None:
            bar.update(1)

        # (d) log line + metrics.jsonl, reconstruction preview, checkpoint
        if logs:
            tracker.log(out_dir, bar, step, tc.max_steps, cfg.data.batch_size * world_size * tc.accum_steps, lr, **log_k)
        if rank == 0 and (step % tc.preview_every == 0 or last) and cfg.loss.lambda_rec > 0:
            with torch.no_grad(), autocast():
                student.vtp.eval()
                save_preview(os.path.join(out_dir, "previews", f"recon_{step:07d}.png"), preview, student.vtp(preview))
                student.vtp.train()
        if step % tc.ckpt_every == 0 or last:
            checkpoint(step)
    if bar is not None:
        bar.close()
    export_if_asked(cfg, student.vtp, tokenizer.state_dict(), rank)
    # The DDP wrapper (and the last graph, which holds its hooks) must be gone before the process group is
    # destroyed, or gloo can abort at exit ("terminate called without an active exception").
    del model, terms
    gc.collect()
    return student


# -----------------------------------------------------------------------------
# Stage 2: decoder-only GAN fine-tuning (Method §1.3, §5)


def load_stage1(cfg: Config):
    """The stage-1 checkpoint stage 2 starts from: --train.init_from (file or folder), else the latest in out_dir
    (rank 0's, sent to every process)."""
    src = cfg.train.init_from or cfg.train.out_dir
    return load_checkpoint(src, f"stage 2 needs a stage-1 checkpoint: none found at {src!r} "
                                "(run stage 1 first, or pass --train.init_from=PATH)")


def stage2_step(vtp, dec, disc, rec_loss, opt_g, opt_d, scaler, xs, step, cfg: Config, autocast, world_size=1):
    """
    One stage-2 step on the micro-batches of images xs (k tensors (B, 3, H, W); k = train.accum_steps): the frozen
    encoder's latents, then
      1) the decoder: L1 + LPIPS + adaptive hinge GAN (discriminator frozen for this pass), its gradient accumulated
         over the micro-batches, clip, AdamW;
      2) from loss.gan_start on, the discriminator: hinge loss on real images vs. the detached reconstructions,
         accumulated the same way.
    Every term is a mean over images, so the k micro-steps give the big batch's gradient, except the adaptive GAN
    weight: a ratio of gradient norms, computed per micro-batch as DDP computes it per GPU.
    `dec` is the (possibly DDP-wrapped) decoder, `vtp.pixel_decoder` the raw one. With fp16 one GradScaler scales
    both backward passes and is updated once per step. Returns the loss terms of each micro-step.
    """
    lc, decoder, k = cfg.loss, vtp.pixel_decoder, len(xs)
    gan_on = step >= lc.gan_start
    disc.requires_grad_(False)
    out, recons = [], []
    for j, x in enumerate(xs):
        with torch.no_grad(), autocast():
            z = vtp.encode(x)
        sync = j == k - 1 or world_size == 1  # all-reduce the decoder's gradients on the last micro-step
        with contextlib.nullcontext() if sync else dec.no_sync():
            with autocast():
                recon = dec(z)
                rec = rec_loss(recon, x)
                logits_fake = disc(recon) if gan_on else None
            g = losses.gan_generator_loss(rec["total"], logits_fake, decoder.proj_out.weight, step, lc.gan_weight,
                                          lc.gan_start, lc.gan_max_adaptive)
            loss = g["total"] / k
            (scaler.scale(loss) if scaler else loss).backward()
        recons.append(recon.detach())
        out.append({"l1": rec["l1"], "lpips": rec["lpips"], "gan": g["gan"], "adaptive_weight": g["adaptive_weight"],
                    "total": g["total"]})
    if scaler:
        scaler.unscale_(opt_g)  # clip the true gradients
    out[-1]["grad_norm"] = torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.optim.grad_clip or float("inf"))
    if scaler:
        scaler.step(opt_g)  # skips the step if the fp16 gradients overflowed
    else:
        opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    if gan_on:
        disc.requires_grad_(True)
        for x, recon, terms in zip(xs, recons, out):
            with autocast():
                d_loss = losses.hinge_d_loss(disc(x), disc(recon))
            (scaler.scale(d_loss / k) if scaler else d_loss / k).backward()
            terms["disc"] = d_loss
        for p in disc.parameters():  # average over processes: the discriminator is not DDP-wrapped
            p.grad = all_reduce_sum(p.grad) / world_size
        if scaler:
            scaler.step(opt_d)
        else:
            opt_d.step()
        opt_d.zero_grad(set_to_none=True)
    if scaler:
        scaler.update()
    return out


def train_stage2(cfg: Config, rank, world_size, device):
    tc, lc = cfg.train, cfg.loss
    out_dir = os.path.join(tc.out_dir, "stage2")
    resume_path, ckpt = load_checkpoint(out_dir) if tc.resume else (None, None)
    src_path, ckpt = (resume_path, ckpt) if resume_path else load_stage1(cfg)
    # the network is the stage-1 one; training settings come from this command line
    src_cfg = Config.from_dict(ckpt["config"])
    cfg.encoder, cfg.decoder, cfg.text, cfg.head = src_cfg.encoder, src_cfg.decoder, src_cfg.text, src_cfg.head
    if tc.export:
        official_config(cfg)  # an option the released format cannot hold fails now, not after training
    tokenizer = data.tokenizer_from_state(ckpt["tokenizer"])
    data_cfg = copy.deepcopy(cfg)  # stage 2 needs only the images: no local crops, the smallest SSL subset
    data_cfg.data.batch_size = tc.stage2_batch_size or cfg.data.batch_size
    data_cfg.data.num_local_crops, data_cfg.data.ssl_batch_size, data_cfg.data.rec_batch_size = 0, 1, 1
    loader = data.build_pretrain_loader(data_cfg, tokenizer, rank, world_size)

    vtp = VTP(cfg)
    vtp.load_state_dict(ckpt["model"])
    vtp.to(device).requires_grad_(False).eval()  # frozen encoder and bottleneck (eval: no stochastic depth)
    decoder = vtp.pixel_decoder.requires_grad_(True).train()
    with seeded(cfg.run.seed):
        disc = losses.PatchDiscriminator(3, lc.disc_channels, lc.disc_layers).to(device)
    rec_loss = losses.ReconstructionLoss(lc.l1_weight, lc.lpips_weight, lc.lpips_vgg_path, lc.lpips_lin_path,
                                         lc.lpips).to(device)
    opt_g = adamw(decoder.parameters(), device, lr=cfg.optim.stage2_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                  weight_decay=0.0)
    opt_d = adamw(disc.parameters(), device, lr=cfg.optim.stage2_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                  weight_decay=0.0)
    autocast, scaler = amp_setup(cfg.run.amp, device)
    step = 0
    if resume_path:  # the decoder's weights came in with ckpt["model"] above
        step = restore(ckpt, {"discriminator": disc, "optimizer": opt_g, "opt_d": opt_d}, scaler, loader)
        print0(f"resumed stage 2 from {resume_path} at step {step}")
        src_path = ckpt.get("init_from", src_path)
    tokenizer_state, ckpt = ckpt["tokenizer"], None  # the mapped file and received tensors are released here
    gc.collect()
    set_grad_checkpointing(decoder, tc.grad_checkpoint)
    if cfg.run.compile:
        compile_blocks(decoder, cfg.run.compile_backend)
    # the discriminator stays outside DDP (grads all-reduced)
    dec = DDP(decoder, gradient_as_bucket_view=True) if world_size > 1 else decoder
    print0(f"stage 2 from {src_path} | decoder {sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M params, "
           f"discriminator {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M | GAN from step {lc.gan_start}")

    if rank == 0:
        trim_metrics(out_dir, step)
    preview = fixed_preview_images(cfg).to(device) if rank == 0 else None
    bar = tqdm(total=tc.max_steps, initial=step, desc="stage 2", dynamic_ncols=True) if rank == 0 else None
    tracker = Tracker(world_size, step)
    terms = None
    # nothing in a stage-2 step draws random numbers: encoder in eval mode, no stochastic depth in the decoder
    while step < tc.max_steps:
        xs = [data.batch_to_device(next(loader), device)["images"] for _ in range(tc.accum_steps)]  # (B, 3, H, W)
        terms = stage2_step(vtp, dec, disc, rec_loss, opt_g, opt_d, scaler, xs, step, cfg, autocast, world_size)
        for t in terms:
            tracker.add(t, step + 1)
        step += 1
        if bar is not None:
            bar.update(1)

        last = step == tc.max_steps
        if step % tc.log_every == 0 or last or step % tc.ckpt_every == 0:
            tracker.log(out_dir, bar, step, tc.max_steps, len(xs) * xs[0].shape[0] * world_size, cfg.optim.stage2_lr)
        if rank == 0 and (step % tc.preview_every == 0 or last):
            with torch.no_grad(), autocast():
                decoder.eval()
                save_preview(os.path.join(out_dir, "previews", f"recon_{step:07d}.png"), preview, vtp(preview))
                decoder.train()
        if step % tc.ckpt_every == 0 or last:
            check_ranks_in_sync(decoder, rank, world_size)
            save_training_state(cfg, out_dir, step, rank, loader, lambda: {
                "model": vtp.state_dict(), "discriminator": disc.state_dict(), "optimizer": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict() if scaler else None, "stage": 2,
                "tokenizer": tokenizer_state, "init_from": src_path})
    if bar is not None:
        bar.close()
    export_if_asked(cfg, vtp, tokenizer_state, rank)
    del dec, terms  # as in stage 1: no DDP wrapper or graph may outlive the process group
    gc.collect()
    return vtp


# -----------------------------------------------------------------------------


def check_recipe_files(cfg: Config):
    """
    Start-up check of the files a preset's recipe needs (Method §4-5): CLIP's BPE vocabulary when text.tokenizer is
    empty (S/B/L: the released models' tokenizer) and the LPIPS weights when loss.lpips=on (S/B/L: L_rec = L1 +
    LPIPS). A missing one names the flag and the explicit opt-out; an opt-out on S/B/L is said in the log.
    """
    t, lc = cfg.text, cfg.loss
    if cfg.train.stage == 1 and not t.tokenizer:
        raise ConfigError(f"text.tokenizer is empty: preset {cfg.preset} uses CLIP's BPE vocabulary, as the released "
                          "VTP models do: pass --text.tokenizer=PATH/bpe_simple_vocab_16e6.txt.gz (or "
                          "--text.tokenizer=bpe to train a byte-level BPE of our own instead)")
    if lc.lpips == "on" and lc.lpips_weight > 0:
        for key, path in (("loss.lpips_vgg_path", lc.lpips_vgg_path), ("loss.lpips_lin_path", lc.lpips_lin_path)):
            if not os.path.isfile(path):
                raise ConfigError(f"--{key}={path!r} is not a file: loss.lpips=on (preset {cfg.preset}: L_rec = L1 + "
                                  "LPIPS) needs the VGG16 and LPIPS v0.1 weights: pass --loss.lpips_vgg_path=... and "
                                  "--loss.lpips_lin_path=..., or --loss.lpips=off for L1 alone")
    if cfg.preset in ("S", "B", "L"):
        if cfg.train.stage == 1 and t.tokenizer == "bpe":
            print0("note: text.tokenizer=bpe: a byte-level BPE of our own, not the released models' CLIP vocabulary")
        if lc.lpips == "off":
            print0("note: loss.lpips=off: L_rec is L1 alone, not the paper's L1 + LPIPS")


def main(argv=None):
    """Parse the config, set up compute, run stage 1 or 2; returns the trained VTP (raw module)."""
    cfg = parse_config(argv)
    cfg.train.out_dir = os.path.expandvars(cfg.train.out_dir)  # e.g. a node-local disk: runs/$RANK
    check_recipe_files(cfg)
    if cfg.train.export and cfg.train.stage == 1:
        official_config(cfg)  # an option the released format cannot hold fails at start-up, naming it
    rank, world_size, _, device = setup_distributed(cfg.run.device, cfg.run.dist_timeout_min)
    try:
        out_dir = cfg.train.out_dir if cfg.train.stage == 1 else os.path.join(cfg.train.out_dir, "stage2")
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            print0(config_summary(cfg, os.path.join(out_dir, "config.json")))
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
        train = train_stage1 if cfg.train.stage == 1 else train_stage2
        result = train(cfg, rank, world_size, device)
    except BaseException:
        cleanup_distributed(barrier=False)  # an error on one rank must not leave it waiting for the others
        raise
    cleanup_distributed()
    return result


if __name__ == "__main__":
    run_cli(main)
