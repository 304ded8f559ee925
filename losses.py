"""
Every objective of VTP (arXiv 2512.13687), each a small function or nn.Module (the README's Method §5).

  Stage 1:  L = λ_rec·L_rec + λ_ssl·L_ssl + λ_clip·L_clip                      (`vtp_loss`)
    L_clip  symmetric InfoNCE over the global batch                             (`clip_loss`)
    L_ssl   = L_dino + L_ibot + koleo_weight·L_koleo                            (`dino_loss`, `ibot_loss`, `koleo_loss`)
            teacher targets by Sinkhorn-Knopp or EMA centering                  (`sinkhorn_knopp`, `TeacherCentering`)
            collapse monitor: entropy of targets and predictions vs log K       (`ssl_entropies`)
    L_rec   = L1 + LPIPS                                                        (`ReconstructionLoss`, `LPIPS`)
  Stage 2:  decoder-only GAN fine-tune                                          (`PatchDiscriminator`, `hinge_d_loss`,
            L_rec + gan_weight·w_adaptive·L_adv                                  `gan_generator_loss`)

Distributed convention: every loss is a per-rank value whose mean over ranks is the full-batch loss, so DDP's
gradient averaging yields exactly the full-batch gradient (see `clip_loss` for the one place where that needs care).
Every collective goes through the helpers below, which do nothing without a process group.

A stage-1 step reads (shapes per rank; B = SSL images, K = prototypes, M = masked tokens, crop-major layouts):

    clip = clip_loss(image_features, text_features, model.logit_scale, rank, world_size)
    with torch.no_grad():  # teacher on the 2 unmasked global crops; the head on [CLS] and on tokens[masks]
        t_cls = sinkhorn_knopp(teacher_cls_logits, teacher_temp, cfg.sinkhorn_iters)      # (2B, K)
        t_patch = sinkhorn_knopp(teacher_masked_patch_logits, teacher_temp, ...)          # (M, K)
    dino = dino_loss(student_global_logits, student_local_logits, t_cls, cfg.student_temp)
    ibot = ibot_loss(student_masked_patch_logits, t_patch, masks, cfg.student_temp)
    koleo = koleo_loss(student_global_cls)                                                # pre-head [CLS], (2B, D)
    losses = vtp_loss(cfg, rec=rec_loss(recon, images), clip=clip, dino=dino, ibot=ibot, koleo=koleo)
"""

import math
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import all_reduce_max, all_reduce_sum, print0

# -----------------------------------------------------------------------------
# CLIP's gather with gradient (Method §5); the plain collectives (all_reduce_sum, ...) are in model.py.


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of the gathered tensor over ranks and returns this rank's slot."""

    @staticmethod
    def forward(ctx, x, rank, world_size):
        ctx.rank, ctx.size = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss used every rank's features; the local slot's gradient is the sum over ranks.
        grad = all_reduce_sum(grad.contiguous().clone())
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None, None


def all_gather_with_grad(t, rank, world_size):
    """
    Gather (B, ...) from every rank into (world_size*B, ...), rank-major, with gradient (Method §5, CLIP).
    The backward all-reduces the gradient of the gathered tensor and returns this rank's slice, so the local
    features receive the gradient of every rank's loss. Every rank must pass the same B. world_size 1: returns `t`.
    """
    if world_size == 1:
        return t
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"all_gather_with_grad: world_size={world_size} but no process group is initialized")
    return _AllGatherWithGrad.apply(t, rank, world_size)


@contextmanager
def _fp32(t):
    """Disable autocast on `t`'s device: softmax / Sinkhorn-Knopp / KoLeo must run in fp32: in bf16/fp16 they lose
    the small differences they are about."""
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


# -----------------------------------------------------------------------------
# CLIP (Method §4-5)


def clip_loss(image_features, text_features, logit_scale, rank=0, world_size=1):
    """
    Symmetric InfoNCE with negatives from the global batch (Method §5, CLIP).

    image_features, text_features: (B, E) L2-normalized local features (the model normalizes them);
    logit_scale: scalar log-scale parameter (the caller clamps it to [0, ln 100]); logits = exp(logit_scale)·f_I·f_Tᵀ.
    Returns a scalar: this rank's rows of ½[CE(logits, diag) + CE(logitsᵀ, diag)], where the local sample i has
    label rank*B + i among the world_size*B gathered candidates.

    Distributed gradients: the mean of this value over ranks is the full-batch loss L. The gather's backward sums
    the gradient over ranks, so rank r's local features get Σ_r' ∂L_r'/∂f_r = world_size·∂L/∂f_r; DDP then divides
    the parameter gradients by world_size, which gives exactly the full-batch gradient ∂L/∂θ.
    """
    with _fp32(image_features):
        img, txt = image_features.float(), text_features.float()  # (B, E)
        all_img = all_gather_with_grad(img, rank, world_size)  # (W*B, E)
        all_txt = all_gather_with_grad(txt, rank, world_size)  # (W*B, E)
        scale = logit_scale.float().exp()
        logits_per_image = scale * img @ all_txt.t()  # (B, W*B): rows of the global logits matrix
        logits_per_text = scale * txt @ all_img.t()  # (B, W*B): rows of its transpose
        labels = rank * img.shape[0] + torch.arange(img.shape[0], device=img.device)  # (B,)
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def cached_gradient_term(tensors, grads):
    """
    Gradient caching (Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
    Limited Setup"): Σ_i <t_i, g_i> in fp32 for tensors t_i and gradients g_i of a loss computed elsewhere (CLIP over
    the whole accumulated batch). Its gradient w.r.t. each t_i is g_i, so its backward sends that loss's gradient
    through the graph that made t_i. Its value is not a loss.
    """
    return sum((t.float() * g).sum() for t, g in zip(tensors, grads))


# -----------------------------------------------------------------------------
# Teacher targets for DINO / iBOT (Method §5, SSL)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits, teacher_temp, n_iters=3, weights=None):
    """
    Teacher probabilities by Sinkhorn-Knopp over the samples of all processes (Method §5; DINOv2/SwAV).

    teacher_logits: (N, K) logits of this rank's samples ([CLS] of both global crops, or the masked patch tokens);
    ranks may hold different N (the total is all-reduced). weights: optional (N,); rows of weight 0 are padding
    (the static-shape iBOT token list) and take no part: their rows come back 0. Returns (N, K) fp32: every real
    row sums to 1 and, as the iterations converge, every prototype gets the same total mass N_total/K over the
    global batch of real rows. (`SinkhornKnopp` does the same over several chunks of rows.)
    """
    return SinkhornKnopp([teacher_logits], teacher_temp, n_iters, [weights]).probs(0)


class SinkhornKnopp:
    """
    Sinkhorn-Knopp over the rows of several chunks of teacher logits (the micro-batches of an accumulated step) and
    of all processes, as if they were one (N_total, K) matrix. Held as scalings, p_nk = e_nk·a_k·b_n·N_total with
    e = exp((logits − global max)/τ): each pass recomputes one chunk's e, so the whole matrix never exists and the
    memory is the chunks' logits plus one chunk's temporaries. `probs(j)`: chunk j's (N_j, K) targets, fp32.
    weights: per chunk, None or (N_j,) with 0 on padding rows (they come back 0).
    Assumes bounded logits (the DINO head gives cosines in [-1, 1]), so exp cannot underflow a whole prototype.
    """

    @torch.no_grad()
    def __init__(self, logits, teacher_temp, n_iters=3, weights=None):
        with _fp32(logits[0]):
            self.logits, self.temp = [t.float() for t in logits], teacher_temp
            weights = weights or [None] * len(logits)
            self.valid = [torch.ones(t.shape[0], dtype=torch.bool, device=t.device) if w is None else w > 0
                          for t, w in zip(self.logits, weights)]  # (N_j,) real rows
            n_total = all_reduce_sum(sum(v.sum() for v in self.valid).float())
            local_max = torch.stack([torch.where(v, t.amax(dim=1), float("-inf")).max() if t.numel() else
                                     t.new_tensor(float("-inf")) for t, v in zip(self.logits, self.valid)]).max()
            self.shift = all_reduce_max(local_max)  # a shift common to all ranks cancels in the normalization
            self.b = [v.float() for v in self.valid]  # (N_j,) row scalings; 0 on padding rows keeps them at 0
            rows = all_reduce_sum(sum(b @ self._exp(j) for j, b in enumerate(self.b)))  # (K,) Σ_n e_nk b_n
            num_prototypes = rows.shape[0]
            self.a = torch.full_like(rows, 1.0) / rows.sum()  # (K,): the matrix sums to 1
            for it in range(n_iters):
                self.a /= self.a * rows * num_prototypes  # every prototype gets mass 1/K ...
                rows = 0.0
                for j in range(len(self.logits)):  # ... every real sample 1/N_total; one e per chunk and iteration
                    e = self._exp(j)
                    cols = self.b[j] * (e @ self.a)  # (N_j,)
                    self.b[j] /= cols.clamp_min(torch.finfo(cols.dtype).tiny) * n_total
                    if it + 1 < n_iters:
                        rows = rows + self.b[j] @ e  # the next iteration's prototype masses
                if it + 1 < n_iters:
                    rows = all_reduce_sum(rows)
            self.n_total = n_total

    def _exp(self, j):
        """e of chunk j: (N_j, K) fp32, 0 on padding rows."""
        e = (self.logits[j] - self.shift).div_(self.temp).exp_()
        return e.masked_fill_(~self.valid[j][:, None], 0.0)

    @torch.no_grad()
    def probs(self, j):
        with _fp32(self.logits[j]):
            return self._exp(j).mul_(self.a).mul_(self.b[j][:, None] * self.n_total)  # (N_j, K), real rows sum to 1


class TeacherCentering(nn.Module):
    """
    Alternative teacher normalization (Method §5; DINO): p_t = softmax((t − c)/τ_t), then
    c ← m·c + (1 − m)·mean(t) with the mean over the samples of all processes and m = 0.9.
    Holds `center` (1, K) as a buffer so it is checkpointed. Use one instance for [CLS] and one for patches.
    """

    def __init__(self, num_prototypes, momentum=0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @torch.no_grad()
    def forward(self, teacher_logits, teacher_temp, weights=None):
        """teacher_logits (N, K) -> (N, K) fp32 probabilities with the current centre; then updates the centre from
        the rows whose `weights` (N,) is > 0 (all rows without weights; weight 0 marks padding)."""
        return self.targets([teacher_logits], teacher_temp, [weights])[0]()

    @torch.no_grad()
    def targets(self, logits, teacher_temp, weights=None):
        """Several chunks of logits (the micro-batches of an accumulated step) at once: the centre is updated once,
        from all of them; `targets(...)[j]()` gives chunk j's probabilities with the centre from before the update,
        computed when asked (so only the logits are held)."""
        center = self.center.clone()  # (1, K)
        self.update(logits, weights)

        def probs(t):
            with _fp32(t):
                return F.softmax((t.float() - center) / teacher_temp, dim=-1)  # (N_j, K)
        return [lambda t=t: probs(t) for t in logits]

    @torch.no_grad()
    def update(self, teacher_logits, weights=None):
        """EMA of the global batch mean of teacher_logits (N, K), or of a list of such chunks, over the real rows
        (weights > 0); a batch with no real row anywhere keeps the centre."""
        chunks = teacher_logits if isinstance(teacher_logits, (list, tuple)) else [teacher_logits]
        weights = weights if isinstance(weights, (list, tuple)) else [weights] * len(chunks)
        stats = all_reduce_sum(sum(self._sums(t, w) for t, w in zip(chunks, weights)))  # one collective for all
        batch_mean, count = stats[:-1].unsqueeze(0), stats[-1]  # (1, K), ()
        new = self.momentum * self.center + (1 - self.momentum) * batch_mean / count.clamp_min(1)
        self.center.copy_(torch.where(count > 0, new, self.center))  # no host sync

    @staticmethod
    def _sums(teacher_logits, weights):
        """(K + 1,): the sums of the real rows of (N, K) logits and their count."""
        logits = teacher_logits.float()
        if weights is not None:
            valid = (weights > 0).float()  # (N,)
            return torch.cat([valid @ logits, valid.sum().reshape(1)])
        return torch.cat([logits.sum(dim=0), logits.new_tensor([logits.shape[0]])])


# -----------------------------------------------------------------------------
# DINO [CLS] loss, iBOT patch loss, KoLeo (Method §5, SSL)


def _soft_cross_entropy(teacher_probs, student_logits, student_temp):
    """−Σ_k p_t log softmax(s/τ_s): (..., K), (..., K) -> (...), in fp32."""
    log_q = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_q).sum(dim=-1)


def dino_loss(student_global_logits, student_local_logits, teacher_probs, student_temp=0.1):
    """
    DINO [CLS] self-distillation loss (Method §5, SSL; DINOv2).

    student_global_logits: (2*B, K) crop-major [crop 0 of all images, then crop 1] (the student sees them masked);
    student_local_logits: (n_local*B, K) crop-major, or None without local crops;
    teacher_probs: (2*B, K) crop-major teacher probabilities (`sinkhorn_knopp` or `TeacherCentering`).
    Cross-entropy over every (student crop, teacher global crop) pair except a global crop with itself, so the
    teacher targets are swapped between the two global crops; each pair is averaged over the B images and the
    result averaged over the 2 + 2·n_local pairs. Returns a scalar (fp32).
    """
    with _fp32(student_global_logits):
        B, K = teacher_probs.shape[0] // 2, teacher_probs.shape[1]
        t = teacher_probs.float().reshape(2, B, K)  # (2, B, K)
        s_global = student_global_logits.reshape(2, B, K)  # (2, B, K)
        # student global crop i against teacher crop 1 - i
        total = _soft_cross_entropy(t.flip(0), s_global, student_temp).mean(dim=1).sum()
        n_pairs = 2
        if student_local_logits is not None:
            s_local = student_local_logits.reshape(-1, B, K)  # (n_local, B, K)
            # each local crop against both teacher crops: Σ_j CE(t_j, s) = CE(t_0 + t_1, s)
            total = total + _soft_cross_entropy(t.sum(0), s_local, student_temp).mean(dim=1).sum()
            n_pairs += 2 * s_local.shape[0]
        return total / n_pairs


def ibot_loss(student_patch_logits, teacher_patch_probs, masks, student_temp=0.1, mask_indices=None,
              mask_weight=None, n_images=None):
    """
    iBOT masked-patch loss (Method §5, SSL; iBOT/DINOv2).

    student_patch_logits: (M, K) student head on the masked patch tokens, M = masks.sum();
    teacher_patch_probs: (M, K) teacher probabilities of the same tokens (teacher sees the unmasked crops);
    masks: (2*B, N) bool, True = masked. Both token lists are in `x[masks]` order (image-major, then patch index),
    which is what `tokens[masks]` on (2*B, N, D) tokens gives.
    The cross-entropy is averaged over the masked patches of each image, then over the images that have any masked
    patch (DINOv2 instead divides by all 2*B crops, i.e. scales the loss by the masked fraction). Unlike DINO the
    student and teacher see the same crop. Returns a scalar (fp32); 0 (with a graph) when nothing is masked.
    mask_indices: optional (M,) flat indices of the True entries of masks.flatten() (the batch's `mask_indices`,
    made by the data loader); with them no boolean indexing runs here, so the step never waits on the GPU.
    mask_weight: optional (M,) weight of each token, 1/(masked patches of its crop), 0 on padding: the data loader
    pads the token list to a fixed length (DINOv2), so M is then that length and the shapes never change.
    n_images: optional divisor instead of this batch's number of masked crops (gradient accumulation passes its
    share of the accumulated batch's, so the k micro-steps add up to that batch's loss).
    """
    with _fp32(student_patch_logits):
        n_masked = masks.sum(dim=-1)  # (2B,)
        image_weight = 1.0 / n_masked.clamp_min(1).float()  # (2B,)
        if mask_weight is not None:
            token_weight = mask_weight.float()  # (M,)
        elif mask_indices is None:
            token_weight = image_weight.unsqueeze(-1).expand_as(masks)[masks]  # (M,)
        else:
            token_weight = image_weight[mask_indices // masks.shape[1]]  # (M,): weight of each token's image
        if n_images is None:
            n_images = (n_masked > 0).sum().clamp_min(1)
        ce = _soft_cross_entropy(teacher_patch_probs, student_patch_logits, student_temp)  # (M,)
        return (ce * token_weight).sum() / n_images


def _row_mean(values, weights=None):
    """Mean of (N,) values over the rows whose weight is > 0 (all rows without weights); 0 when there is none."""
    valid = torch.ones_like(values) if weights is None else (weights > 0).float()
    return (values * valid).sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def mean_entropy(probs, weights=None):
    """
    Mean over rows of the entropy −Σ_k p_k log p_k in nats (collapse diagnostic; DINO §5.3 tracks the same).
    probs: (N, K) rows summing to 1 -> scalar fp32: log K for uniform rows, 0 for one-hot rows, 0 when N = 0.
    weights: optional (N,); rows of weight 0 (padding) are left out.
    """
    with _fp32(probs):
        p = probs.float()
        return _row_mean(-torch.special.xlogy(p, p).sum(dim=-1), weights)  # xlogy: 0·log 0 = 0


@torch.no_grad()
def softmax_entropy(logits, temp, weights=None):
    """Mean entropy (nats) of softmax(logits / temp) over rows (of weight > 0): (N, K) -> scalar fp32; 0 when N = 0."""
    with _fp32(logits):
        log_q = F.log_softmax(logits.float() / temp, dim=-1)
        return _row_mean(-(log_q.exp() * log_q).sum(dim=-1), weights)


def ssl_entropies(teacher_cls, teacher_patch, student_cls, student_patch, student_temp, patch_weight=None):
    """
    What the uniform collapse looks like, in nats next to log K (Method §5, SSL): the entropy of the teacher's
    targets and of the student's predictions, for DINO ([CLS]) and iBOT (masked patches). A healthy run has the
    teacher's targets well below log K and the student following them down; both at log K is the uniform collapse.
    teacher_cls (2B, K), teacher_patch (M, K): probabilities; student_cls (n, K), student_patch (M, K): logits;
    patch_weight: optional (M,), 0 on padded tokens (left out).
    Returns {"ent_t_dino", "ent_s_dino", "ent_t_ibot", "ent_s_ibot"} scalars on the device (no host sync).
    """
    return {"ent_t_dino": mean_entropy(teacher_cls), "ent_s_dino": softmax_entropy(student_cls, student_temp),
            "ent_t_ibot": mean_entropy(teacher_patch, patch_weight),
            "ent_s_ibot": softmax_entropy(student_patch, student_temp, patch_weight)}


def koleo_loss(cls_features, n_crops=2, eps=1e-8):
    """
    KoLeo regularizer (Method §5, SSL; DINOv2): −mean_i log(min_{j≠i} ‖x_i − x_j‖ + eps) on L2-normalized
    features, computed within each crop separately and summed over the crops, as DINOv2 sums its per-crop terms.
    Neighbours are searched within this process's batch (DINOv2 does the same per GPU).

    cls_features: (n_crops*B, D) crop-major pre-head student [CLS] of the global crops (B >= 2); normalized here.
    Runs in fp32. Returns a scalar.
    """
    with _fp32(cls_features):
        x = cls_features.float()
        x = F.normalize(x.reshape(n_crops, -1, x.shape[-1]), dim=-1, eps=eps)  # (n_crops, B, D)
        with torch.no_grad():  # nearest neighbour = largest cosine among the others
            sim = x @ x.transpose(1, 2)  # (n_crops, B, B)
            sim.diagonal(dim1=1, dim2=2).fill_(-3.0)  # below any cosine: never pick yourself
            nn_idx = sim.argmax(dim=-1)  # (n_crops, B)
        neighbours = torch.gather(x, 1, nn_idx.unsqueeze(-1).expand_as(x))  # (n_crops, B, D)
        dist_nn = torch.linalg.vector_norm(x - neighbours, dim=-1)  # (n_crops, B); grad 0 at distance 0
        return -torch.log(dist_nn + eps).mean(dim=1).sum()


# -----------------------------------------------------------------------------
# Reconstruction: L1 + LPIPS (Method §5). LPIPS written from its definition; weights come from user files.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS scaling layer, applied to images in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)
# VGG16 convolutions up to relu5_3; "M" = 2x2 max-pool. Indices in `features` then match torchvision's vgg16.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class _LinearHead(nn.Module):
    """LPIPS 1x1 head of one stage: Dropout then Conv2d(C, 1, 1, bias=False); keys `model.1.weight` (1, C, 1, 1)."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """
    LPIPS v0.1 with a VGG16 trunk (Method §5, reconstruction), frozen and always in eval mode.

    forward(x, y): x, y (B, 3, H, W) in [-1, 1] -> (B,) distances. Per stage s of relu{1_2,2_2,3_3,4_3,5_3}:
    unit-normalize the features over channels (eps 1e-10), square the difference, weight channels with the 1x1
    head lin{s}, average over space; sum over stages. Gradients flow to the images, never to the weights.
    State-dict keys: `features.N.{weight,bias}` (torchvision vgg16 indices) and `lin{s}.model.1.weight`.
    """

    def __init__(self, eps=1e-10):
        super().__init__()
        self.eps = eps
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        layers, in_ch = [], 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)
        for i, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{i}", _LinearHead(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """Always eval: the heads' Dropout must stay off even when a parent module is put in train mode."""
        return super().train(False)

    def load_weights(self, vgg_path, lin_path):
        """Load ImageNet VGG16 (`vgg16-397923af.pth` layout; classifier keys ignored) and the LPIPS v0.1 heads."""
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        self.features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")})
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        for i in range(len(LPIPS_CHANNELS)):
            key = f"lin{i}.model.1.weight"
            if key not in lin:
                raise KeyError(f"{lin_path}: missing LPIPS head {key!r} (expected the LPIPS v0.1 vgg.pth layout)")
            getattr(self, f"lin{i}").load_state_dict({"model.1.weight": lin[key]})
        return self

    def _normalize(self, f):
        """Unit length over channels: (B, C, h, w) -> (B, C, h, w). Clamp keeps the sqrt gradient finite at 0."""
        f = f.float()
        return f / (f.pow(2).sum(dim=1, keepdim=True).clamp_min(self.eps ** 2).sqrt() + self.eps)

    def forward(self, x, y):
        h = torch.cat([x, y], dim=0)  # one trunk pass for both: (2B, 3, H, W)
        h = (h - self.shift) / self.scale
        dist_total = 0.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                s = VGG16_TAPS.index(i)
                with _fp32(h):
                    fx, fy = self._normalize(h).chunk(2, dim=0)  # (B, C, h, w) each
                    d = getattr(self, f"lin{s}")((fx - fy).pow(2))  # (B, 1, h, w)
                dist_total = dist_total + d.mean(dim=(1, 2, 3))  # (B,)
        return dist_total


def imagenet_to_unit(x):
    """ImageNet-normalized images (B, 3, H, W) -> the same images in [-1, 1] (denormalize, then 2x - 1)."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 2 - 1


class ReconstructionLoss(nn.Module):
    """
    L_rec = l1_weight·L1 + lpips_weight·LPIPS (Method §5, reconstruction).

    forward(recon, target): both (B, 3, H, W) ImageNet-normalized (the decoder's output space). L1 is the mean
    absolute error in that space; LPIPS runs on the images mapped to [-1, 1] and is averaged over the batch.
    Returns {"l1", "lpips", "total"} scalars (fp32). LPIPS needs both weight files (LossConfig.lpips_vgg_path and
    lpips_lin_path). mode (LossConfig.lpips): "auto" = without the files the perceptual term is 0 and one log line
    says so; "on" = the files are required; "off" = L1 alone. Move the module to the device.
    """

    def __init__(self, l1_weight=1.0, lpips_weight=1.0, vgg_path="", lin_path="", mode="auto"):
        super().__init__()
        self.l1_weight, self.lpips_weight = l1_weight, lpips_weight
        self.lpips = None
        if lpips_weight == 0:
            print0("LPIPS disabled: loss.lpips_weight=0; reconstruction uses L1 only")
        elif mode == "off":
            print0("LPIPS disabled: loss.lpips=off; reconstruction uses L1 only")
        elif not vgg_path and not lin_path and mode == "auto":
            print0("LPIPS disabled: no VGG16 weights given (--loss.lpips_vgg_path, --loss.lpips_lin_path); "
                   "reconstruction uses L1 only")
        else:
            for key, path in (("loss.lpips_vgg_path", vgg_path), ("loss.lpips_lin_path", lin_path)):
                if not path:
                    raise ValueError(f"LPIPS needs both weight files: --{key} is empty")
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"--{key}={path}: file not found")
            self.lpips = LPIPS().load_weights(vgg_path, lin_path)

    def forward(self, recon, target):
        l1 = (recon.float() - target.float()).abs().mean()
        if self.lpips is None:
            lpips = l1.new_zeros(())
        else:
            lpips = self.lpips(imagenet_to_unit(recon), imagenet_to_unit(target)).mean()
        return {"l1": l1, "lpips": lpips, "total": self.l1_weight * l1 + self.lpips_weight * lpips}


# -----------------------------------------------------------------------------
# Stage 2: PatchGAN discriminator, hinge losses, adaptive weight (Method §5, Stage-2 GAN)


class PatchDiscriminator(nn.Module):
    """
    PatchGAN (pix2pix NLayerDiscriminator shape; Method §5 Stage-2 GAN): (B, 3, H, W) -> (B, 1, h, w) patch logits.

    conv4x4 s2 + LeakyReLU(0.2); then n_layers − 1 × [conv4x4 s2 + norm + LeakyReLU], doubling channels (cap 8×);
    one conv4x4 s1 + norm + LeakyReLU; a final conv4x4 s1 to 1 channel. n_layers strided convs in all.
    Norm is GroupNorm(32) rather than BatchNorm [ours]: no running statistics, no cross-rank sync needed under DDP,
    and identical behaviour on real and fake batches fed separately. 256 px input -> 30x30 patch logits.
    """

    def __init__(self, in_channels=3, channels=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.GroupNorm(math.gcd(32, channels * mult), channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss ½[mean relu(1 − D(x)) + mean relu(1 + D(x̂))]; logits any shape -> scalar."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake):
    """Generator hinge loss −mean D(x̂); logits any shape -> scalar."""
    return -logits_fake.float().mean()


def adaptive_gan_weight(rec_loss, gan_loss, last_layer_weight, max_weight=1e4):
    """
    ‖∇_w L_rec‖ / (‖∇_w L_adv‖ + 1e-4) at the decoder's last layer weight w, clamped to [0, max_weight] and
    detached (Method §5 Stage-2 GAN; VQGAN). Uses autograd.grad with retain_graph, so .backward() can follow.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    weight = g_rec.float().norm() / (g_adv.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def gan_generator_loss(rec_loss, logits_fake, last_layer_weight, step, gan_weight=0.5, gan_start=0,
                       max_adaptive=1e4):
    """
    Stage-2 decoder objective (Method §5): rec_loss + [step >= gan_start]·gan_weight·w_adaptive·hinge_g(D(x̂)).

    rec_loss: scalar L_rec (ReconstructionLoss "total"); logits_fake: discriminator output on the reconstruction
    (may be None before gan_start); last_layer_weight: the decoder's final layer weight (its conv/linear `.weight`).
    Returns {"gan", "adaptive_weight", "total"}; before gan_start "gan" and "adaptive_weight" are 0.
    """
    if step < gan_start or logits_fake is None:
        zero = rec_loss.new_zeros(())
        return {"gan": zero, "adaptive_weight": zero, "total": rec_loss}
    gan = hinge_g_loss(logits_fake)
    w = adaptive_gan_weight(rec_loss, gan, last_layer_weight, max_adaptive)
    return {"gan": gan, "adaptive_weight": w, "total": rec_loss + gan_weight * w * gan}


# -----------------------------------------------------------------------------
# Stage-1 total (Method §1, §5)


def vtp_loss(loss_cfg, rec=None, clip=None, dino=None, ibot=None, koleo=None):
    """
    L = λ_rec·L_rec + λ_ssl·L_ssl + λ_clip·L_clip with L_ssl = L_dino + L_ibot + koleo_weight·L_koleo
    (Method §1, §5).

    loss_cfg: LossConfig (lambda_rec, lambda_ssl, lambda_clip, koleo_weight). rec: ReconstructionLoss's dict
    (or a scalar); clip, dino, ibot, koleo: scalars. A term whose λ is 0 is not needed (pass None; a given one is
    ignored), which gives the paper's ablations; a term whose λ is > 0 must be given.
    Returns {"total"} plus the terms used: "rec" (and "l1", "lpips"), "clip", "dino", "ibot", "koleo", "ssl".
    """
    def need(term, name, lam):
        if term is None:
            raise ValueError(f"vtp_loss: loss.{lam} > 0 but no {name} loss was given")
        return term

    out, total = {}, 0.0
    if loss_cfg.lambda_rec > 0:
        rec = need(rec, "reconstruction", "lambda_rec")
        if isinstance(rec, dict):
            out.update(l1=rec["l1"], lpips=rec["lpips"])
            rec = rec["total"]
        out["rec"] = rec
        total = total + loss_cfg.lambda_rec * rec
    if loss_cfg.lambda_ssl > 0:
        out["dino"] = need(dino, "DINO", "lambda_ssl")
        out["ibot"] = need(ibot, "iBOT", "lambda_ssl")
        out["koleo"] = need(koleo, "KoLeo", "lambda_ssl")
        out["ssl"] = out["dino"] + out["ibot"] + loss_cfg.koleo_weight * out["koleo"]
        total = total + loss_cfg.lambda_ssl * out["ssl"]
    if loss_cfg.lambda_clip > 0:
        out["clip"] = need(clip, "CLIP", "lambda_clip")
        total = total + loss_cfg.lambda_clip * out["clip"]
    out["total"] = total
    return out
