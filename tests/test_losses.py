"""Tests of losses.py: hand-worked values, 2-process gloo parity, LPIPS loading, GAN adaptive weight, bf16 autocast."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from losses import (LPIPS, PatchDiscriminator, ReconstructionLoss, TeacherCentering, adaptive_gan_weight,
                    clip_loss, dino_loss, gan_generator_loss, hinge_d_loss, hinge_g_loss, ibot_loss,
                    imagenet_to_unit, koleo_loss, mean_entropy, sinkhorn_knopp, softmax_entropy, ssl_entropies,
                    vtp_loss)
from model import LossConfig

# -----------------------------------------------------------------------------
# CLIP


def test_clip_aligned_features_at_high_scale_give_zero():
    f = torch.eye(8, 16)  # (B, E) orthonormal rows
    loss = clip_loss(f, f.clone(), torch.tensor(math.log(100.0)))
    assert loss.item() < 1e-6
    # the same features at scale 1 are far from 0: the scale is exp(logit_scale), not ignored
    assert clip_loss(f, f, torch.tensor(0.0)).item() > 1.0


def test_clip_independent_features_give_log_b():
    g = torch.Generator().manual_seed(0)
    B, E = 64, 4096
    img = F.normalize(torch.randn(B, E, generator=g), dim=-1)
    txt = F.normalize(torch.randn(B, E, generator=g), dim=-1)
    loss = clip_loss(img, txt, torch.tensor(0.0))  # cosines ~ 0 ± 1/64, so every logit ~ 0
    assert abs(loss.item() - math.log(B)) < 0.01


def test_clip_hand_worked_2x2_is_symmetric_mean():
    r = 1 / math.sqrt(2)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [r, r]])  # logits = [[1, r], [0, r]] at scale 1
    ce = lambda row, k: -math.log(math.exp(row[k]) / sum(math.exp(v) for v in row))  # noqa: E731
    per_image = (ce([1, r], 0) + ce([0, r], 1)) / 2  # rows
    per_text = (ce([1, 0], 0) + ce([r, r], 1)) / 2  # columns
    loss = clip_loss(img, txt, torch.tensor(0.0))
    assert loss.item() == pytest.approx(0.5 * (per_image + per_text), abs=1e-6)


# -----------------------------------------------------------------------------
# Teacher targets: Sinkhorn-Knopp and centering


def test_sinkhorn_equal_row_and_column_mass():
    g = torch.Generator().manual_seed(0)
    N, K = 12, 6
    logits = torch.randn(N, K, generator=g)
    logits[:, 0] += 3.0  # every sample prefers prototype 0: softmax would collapse onto it
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iters=200)
    assert torch.allclose(q.sum(dim=1), torch.ones(N), atol=1e-5)  # each sample is a distribution
    assert torch.allclose(q.sum(dim=0), torch.full((K,), N / K), atol=1e-4)  # each prototype gets N/K
    # with the default 3 iterations rows are exact and columns already much more balanced than softmax
    q3 = sinkhorn_knopp(logits, teacher_temp=0.5, n_iters=3)
    soft = F.softmax(logits / 0.5, dim=-1)
    assert torch.allclose(q3.sum(dim=1), torch.ones(N), atol=1e-5)
    imbalance = lambda p: (p.sum(0) - N / K).abs().max().item()  # noqa: E731
    assert imbalance(q3) < 0.5 * imbalance(soft)


def test_centering_hand_worked():
    center = TeacherCentering(num_prototypes=3, momentum=0.9)
    logits = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])  # batch mean [2, 0, 0]
    p = center(logits, teacher_temp=0.5)
    assert torch.allclose(p, F.softmax(logits / 0.5, dim=-1))  # the centre starts at 0 and is applied before update
    assert torch.allclose(center.center, torch.tensor([[0.2, 0.0, 0.0]]))
    p = center(torch.zeros(1, 3), teacher_temp=0.5)
    assert torch.allclose(p, F.softmax(torch.tensor([[-0.4, 0.0, 0.0]]), dim=-1))
    assert torch.allclose(center.center, torch.tensor([[0.18, 0.0, 0.0]]))
    assert "center" in center.state_dict()


# -----------------------------------------------------------------------------
# DINO, iBOT, KoLeo


def test_dino_uniform_student_and_teacher_give_log_k():
    B, K, n_local = 3, 50, 4
    uniform = torch.full((2 * B, K), 1.0 / K)
    loss = dino_loss(torch.zeros(2 * B, K), torch.zeros(n_local * B, K), uniform, student_temp=0.1)
    assert loss.item() == pytest.approx(math.log(K), rel=1e-6)


def test_entropy_diagnostics_hand_worked():
    K = 64
    uniform, one_hot = torch.full((5, K), 1.0 / K), torch.eye(K)[:5]
    assert mean_entropy(uniform).item() == pytest.approx(math.log(K), rel=1e-6)
    assert mean_entropy(one_hot).item() == 0.0  # 0·log 0 counts as 0, not nan
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # log 2 and 0: mean log(2)/2
    assert mean_entropy(half).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert mean_entropy(torch.zeros(0, K)).item() == 0.0  # no masked patch in the batch
    # student side: softmax(logits / temp); equal logits are uniform, a gap of 1 at temp 0.01 is one-hot
    assert softmax_entropy(torch.zeros(3, K), 0.1).item() == pytest.approx(math.log(K), rel=1e-6)
    assert softmax_entropy(torch.eye(K)[:3], 0.01).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.tensor([[0.0, 0.0, -100.0]])  # two equal logits, one negligible: log 2
    assert softmax_entropy(two, 1.0).item() == pytest.approx(math.log(2), rel=1e-6)
    ent = ssl_entropies(uniform, one_hot, torch.zeros(4, K), torch.eye(K)[:2] * 100, student_temp=0.1)
    assert ent["ent_t_dino"].item() == pytest.approx(math.log(K), rel=1e-6) and ent["ent_t_ibot"].item() == 0.0
    assert ent["ent_s_dino"].item() == pytest.approx(math.log(K), rel=1e-6)
    assert ent["ent_s_ibot"].item() == pytest.approx(0.0, abs=1e-6)


def test_dino_pairs_match_explicit_loop():
    g = torch.Generator().manual_seed(1)
    B, K, n_local, tau = 2, 7, 3, 0.1
    s_g = torch.randn(2 * B, K, generator=g)
    s_l = torch.randn(n_local * B, K, generator=g)
    t = F.softmax(torch.randn(2 * B, K, generator=g), dim=-1)
    crops = [s_g[:B], s_g[B:]] + [s_l[i * B:(i + 1) * B] for i in range(n_local)]  # crop-major layout
    terms = []
    for i, s in enumerate(crops):
        for j in range(2):
            if i == j:  # a global crop never predicts its own teacher output
                continue
            ce = -(t[j * B:(j + 1) * B] * F.log_softmax(s / tau, dim=-1)).sum(-1).mean()
            terms.append(ce)
    assert len(terms) == 2 + 2 * n_local
    expected = torch.stack(terms).mean()
    assert torch.allclose(dino_loss(s_g, s_l, t, tau), expected, atol=1e-6)
    # without local crops: only the two swapped global pairs
    assert torch.allclose(dino_loss(s_g, None, t, tau), torch.stack(terms[:2]).mean(), atol=1e-6)


def test_ibot_uniform_student_and_teacher_give_log_k():
    K = 40
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3] = True
    masks[2, 4:] = True
    M = int(masks.sum())
    loss = ibot_loss(torch.zeros(M, K), torch.full((M, K), 1.0 / K), masks)
    assert loss.item() == pytest.approx(math.log(K), rel=1e-6)


def test_ibot_averages_per_image_then_over_masked_images():
    masks = torch.tensor([[True, False, False, False],  # image 0: 1 masked token
                          [False, True, True, True],  # image 1: 3 masked tokens
                          [False, False, False, False]])  # image 2: not masked, must not count
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # (M, K) in masks[masks] order
    t = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    ce = -F.log_softmax(s / 0.5, dim=-1)[:, 0]  # (M,)
    expected = (ce[0] + ce[1:].mean()) / 2  # a plain token mean would be ce.mean()
    assert torch.allclose(ibot_loss(s, t, masks, student_temp=0.5), expected, atol=1e-6)
    # nothing masked: zero, and still differentiable
    s0 = torch.zeros(0, 2, requires_grad=True)
    loss0 = ibot_loss(s0, torch.zeros(0, 2), torch.zeros(3, 4, dtype=torch.bool))
    loss0.backward()
    assert loss0.item() == 0.0


def test_padded_ibot_tokens_change_no_target_loss_or_entropy():
    """The data loader pads the masked-token list to a fixed length with weight-0 rows (static shapes under
    compile). Padding must be invisible: Sinkhorn-Knopp and the centre see only the real rows, iBOT and the
    entropies average only over them. Padded rows hold garbage logits here, so any leak shows."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3], masks[2, 4:] = True, True
    idx = masks.flatten().nonzero().flatten()  # (M,) real tokens
    M, K, pad = idx.numel(), 16, 5
    t_logits, s_logits = torch.randn(M, K, generator=g), torch.randn(M, K, generator=g)
    weight = 1.0 / masks.sum(1).clamp_min(1).float()[idx // 9]  # (M,)
    junk = torch.randn(pad, K, generator=g) * 10
    t_pad, s_pad = torch.cat([t_logits, junk]), torch.cat([s_logits, junk])
    w_pad = torch.cat([weight, torch.zeros(pad)])

    q, q_pad = sinkhorn_knopp(t_logits, 0.05), sinkhorn_knopp(t_pad, 0.05, weights=w_pad)
    assert torch.allclose(q_pad[:M], q, atol=1e-6) and torch.equal(q_pad[M:], torch.zeros(pad, K))
    c, c_pad = TeacherCentering(K), TeacherCentering(K)
    p, p_pad = c(t_logits, 0.05), c_pad(t_pad, 0.05, weights=w_pad)
    assert torch.allclose(p_pad[:M], p) and torch.allclose(c_pad.center, c.center, atol=1e-7)
    loss = ibot_loss(s_logits, q, masks, student_temp=0.1)
    assert torch.allclose(ibot_loss(s_pad, q_pad, masks, 0.1, mask_weight=w_pad), loss, atol=1e-6)
    ent, ent_pad = ssl_entropies(q, q, s_logits, s_logits, 0.1), ssl_entropies(q, q_pad, s_logits, s_pad, 0.1, w_pad)
    for k in ("ent_t_ibot", "ent_s_ibot"):
        assert ent_pad[k].item() == pytest.approx(ent[k].item(), rel=1e-6), k


def _on_circle(angles, radii):
    a = torch.tensor(angles, dtype=torch.float64)
    return (torch.stack([a.cos(), a.sin()], dim=-1) * torch.tensor(radii, dtype=torch.float64)[:, None]).float()


def test_koleo_hand_worked_per_crop():
    # Points on the unit circle (radii are removed by the L2 normalization); chord = 2 sin(Δθ/2).
    crop0 = _on_circle([0.0, 0.1, 0.3, 1.0], [1.0, 2.0, 0.5, 3.0])  # nearest gaps 0.1, 0.1, 0.2, 0.7
    crop1 = _on_circle([0.05, 0.5, 1.5, 2.0], [1.0, 1.0, 1.0, 1.0])  # nearest gaps 0.45, 0.45, 0.5, 0.5
    chord = lambda d: 2 * math.sin(d / 2)  # noqa: E731
    k0 = -sum(math.log(chord(d) + 1e-8) for d in (0.1, 0.1, 0.2, 0.7)) / 4
    k1 = -sum(math.log(chord(d) + 1e-8) for d in (0.45, 0.45, 0.5, 0.5)) / 4
    loss = koleo_loss(torch.cat([crop0, crop1]), n_crops=2)  # crop-major (2B, D)
    # summed over the two crops as DINOv2 sums them (a mean would halve KoLeo's weight); pooling the crops would find
    # the 0.05-gaps between them
    assert loss.item() == pytest.approx(k0 + k1, abs=1e-5)


def test_koleo_gradient_is_finite_for_duplicates():
    x = torch.randn(2 * 4, 8)
    x[1] = x[0]  # distance 0
    x.requires_grad_(True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all()


# -----------------------------------------------------------------------------
# fp32 islands under bf16 autocast


def test_fp32_losses_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    B, E, K = 16, 32, 64
    bf = lambda *shape: torch.randn(*shape, generator=g).bfloat16()  # noqa: E731
    img, txt = F.normalize(bf(B, E).float(), dim=-1).bfloat16(), F.normalize(bf(B, E).float(), dim=-1).bfloat16()
    s_g, s_l, t_logits, cls = bf(2 * B, K), bf(4 * B, K), bf(2 * B, K), bf(2 * B, E)
    masks = torch.rand(2 * B, 9, generator=g) < 0.4
    M = int(masks.sum())
    s_p, t_p = bf(M, K), bf(M, K)
    scale = torch.tensor(math.log(100.0))

    def run(cast):
        c = (lambda x: x.float()) if cast else (lambda x: x)
        q = sinkhorn_knopp(c(t_logits), 0.04)
        qp = sinkhorn_knopp(c(t_p), 0.04)
        return [clip_loss(c(img), c(txt), scale), q, dino_loss(c(s_g), c(s_l), q),
                ibot_loss(c(s_p), qp, masks), koleo_loss(c(cls))]

    ref = run(cast=True)  # fp32 on the bf16-rounded values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(cast=False)  # bf16 tensors under autocast: each loss must switch to fp32 itself
    for name, a, b in zip(["clip", "sinkhorn", "dino", "ibot", "koleo"], out, ref):
        assert a.dtype == torch.float32, name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


# -----------------------------------------------------------------------------
# 2-process gloo parity (CLIP, DINO + iBOT with Sinkhorn-Knopp, centering)

W, B_LOCAL, E, K, N_PATCH, N_LOCAL = 2, 4, 16, 10, 6, 2


def _global_data():
    """The full batch, identical in every process. Crop-major layouts: row c*B + b is crop c of image b."""
    g = torch.Generator().manual_seed(123)
    B = W * B_LOCAL
    masks = torch.zeros(2 * B, N_PATCH, dtype=torch.bool)
    for i in range(0, 2 * B, 2):  # every other crop masked, with rank-dependent token counts
        masks[i, : 1 + i % 5] = True
    return dict(x=torch.randn(B, 12, generator=g), proj=torch.randn(E, 12, generator=g),
                txt=F.normalize(torch.randn(B, E, generator=g), dim=-1),
                s_g=torch.randn(2 * B, K, generator=g), s_l=torch.randn(N_LOCAL * B, K, generator=g),
                t_g=torch.randn(2 * B, K, generator=g), masks=masks,
                s_p=torch.randn(int(masks.sum()), K, generator=g), t_p=torch.randn(int(masks.sum()), K, generator=g))


def _crop_rows(n_crops, rank):
    """Row indices of this rank's images in an (n_crops*B, ...) crop-major tensor."""
    B = W * B_LOCAL
    return torch.cat([torch.arange(c * B + rank * B_LOCAL, c * B + (rank + 1) * B_LOCAL) for c in range(n_crops)])


def _token_rows(masks, rows):
    """Indices into the (M, K) masked-token list of the tokens of crops `rows`."""
    owner = torch.arange(masks.shape[0]).unsqueeze(-1).expand_as(masks)[masks]  # (M,) crop of each token
    return torch.nonzero(torch.isin(owner, rows)).squeeze(-1)


def _ssl_terms(d, rows2, rows_l, tok):
    """DINO + iBOT with Sinkhorn-Knopp and the updated centring buffer, on a subset of the batch."""
    q = sinkhorn_knopp(d["t_g"][rows2], 0.05)
    qp = sinkhorn_knopp(d["t_p"][tok], 0.05)
    centering = TeacherCentering(K)
    centering(d["t_p"][tok], 0.05)
    return dict(q=q, qp=qp, center=centering.center.clone(),
                dino=dino_loss(d["s_g"][rows2], d["s_l"][rows_l], q),
                ibot=ibot_loss(d["s_p"][tok], qp, d["masks"][rows2]))


def _clip_terms(d, rows, rank, world_size):
    """CLIP through a shared linear layer, so the DDP-averaged parameter gradient can be compared."""
    proj = d["proj"].clone().requires_grad_(True)
    img = F.normalize(d["x"][rows] @ proj.t(), dim=-1)
    img.retain_grad()
    txt = d["txt"][rows].clone().requires_grad_(True)
    loss = clip_loss(img, txt, torch.tensor(math.log(20.0)), rank, world_size)
    loss.backward()
    return dict(clip=loss.detach(), img_grad=img.grad, txt_grad=txt.grad, proj_grad=proj.grad)


def _dist_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        d = _global_data()
        rows2, rows_l = _crop_rows(2, rank), _crop_rows(N_LOCAL, rank)
        out = _clip_terms(d, torch.arange(rank * B_LOCAL, (rank + 1) * B_LOCAL), rank, W)
        out.update(_ssl_terms(d, rows2, rows_l, _token_rows(d["masks"], rows2)))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # before destroy: gloo can abort at exit otherwise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_dist_worker, args=(str(tmp / "init"), str(tmp)), nprocs=W, join=True)
    per_rank = [torch.load(tmp / f"rank{r}.pt") for r in range(W)]
    d = _global_data()
    B = W * B_LOCAL
    full = _clip_terms(d, torch.arange(B), 0, 1)
    full.update(_ssl_terms(d, torch.arange(2 * B), torch.arange(N_LOCAL * B), torch.arange(len(d["s_p"]))))
    return per_rank, full, d


def test_dist_clip_matches_full_batch(dist_results):
    per_rank, full, _ = dist_results
    # value: the per-rank losses average to the full-batch loss
    assert torch.allclose(torch.stack([r["clip"] for r in per_rank]).mean(), full["clip"], atol=1e-6)
    # feature gradients: rank r gets world_size x the full-batch gradient of its slice (the gather sums over ranks)
    for rank, r in enumerate(per_rank):
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        assert torch.allclose(r["img_grad"], W * full["img_grad"][sl], atol=1e-6)
        assert torch.allclose(r["txt_grad"], W * full["txt_grad"][sl], atol=1e-6)
    # so DDP's mean of the parameter gradients is exactly the full-batch parameter gradient
    ddp_grad = torch.stack([r["proj_grad"] for r in per_rank]).mean(0)
    assert torch.allclose(ddp_grad, full["proj_grad"], atol=1e-6)


def test_dist_dino_ibot_sinkhorn_match_full_batch(dist_results):
    per_rank, full, d = dist_results
    for rank, r in enumerate(per_rank):
        assert torch.allclose(r["q"], full["q"][_crop_rows(2, rank)], atol=1e-6)
        assert torch.allclose(r["qp"], full["qp"][_token_rows(d["masks"], _crop_rows(2, rank))], atol=1e-6)
        assert torch.allclose(r["center"], full["center"], atol=1e-6)  # all-reduced batch mean
    assert per_rank[0]["qp"].shape[0] != per_rank[1]["qp"].shape[0]  # unequal token counts were exercised
    for key in ("dino", "ibot"):
        mean = torch.stack([r[key] for r in per_rank]).mean()
        assert torch.allclose(mean, full[key], atol=1e-6), key
    # a per-rank (not all-reduced) Sinkhorn-Knopp would differ from the global one on this data
    local = sinkhorn_knopp(d["t_g"][_crop_rows(2, 0)], 0.05)
    assert not torch.allclose(local, full["q"][_crop_rows(2, 0)], atol=1e-4)


# -----------------------------------------------------------------------------
# Reconstruction: L1 + LPIPS

VGG_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
             17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights saved in the torchvision vgg16 and LPIPS v0.1 layouts."""
    g = torch.Generator().manual_seed(0)
    vgg = {"classifier.0.weight": torch.zeros(4, 4)}  # real files carry classifier keys; they must be ignored
    for i, (cin, cout) in VGG_CONVS.items():
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    lin = {f"lin{s}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for s, c in
           enumerate((64, 128, 256, 512, 512))}
    tmp = tmp_path_factory.mktemp("lpips")
    torch.save(vgg, tmp / "vgg16.pth")
    torch.save(lin, tmp / "lin.pth")
    return str(tmp / "vgg16.pth"), str(tmp / "lin.pth"), vgg, lin


def _images(seed, n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_zero_positive_symmetric(lpips_files):
    model = LPIPS().load_weights(*lpips_files[:2])
    x, y = _images(0), _images(1)
    assert torch.allclose(model(x, x), torch.zeros(2), atol=1e-6)
    d_xy, d_yx = model(x, y), model(y, x)
    assert (d_xy > 0).all()
    assert torch.allclose(d_xy, d_yx, atol=1e-6)
    assert torch.equal(model.features[28].weight, lpips_files[2]["features.28.weight"])
    assert torch.equal(model.lin4.model[1].weight, lpips_files[3]["lin4.model.1.weight"])


def test_lpips_first_stage_matches_definition(lpips_files):
    vgg_path, lin_path, vgg, lin = lpips_files
    only_lin0 = {k: (v if k.startswith("lin0") else torch.zeros_like(v)) for k, v in lin.items()}
    torch.save(only_lin0, lin_path + ".lin0")
    model = LPIPS().load_weights(vgg_path, lin_path + ".lin0")
    x, y = _images(2), _images(3)

    def relu1_2(img):
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        h = F.relu(F.conv2d((img - shift) / scale, vgg["features.0.weight"], vgg["features.0.bias"], padding=1))
        h = F.relu(F.conv2d(h, vgg["features.2.weight"], vgg["features.2.bias"], padding=1))
        return h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    diff = (relu1_2(x) - relu1_2(y)).pow(2)  # (B, 64, H, W)
    expected = (diff * lin["lin0.model.1.weight"]).sum(1).mean(dim=(1, 2))  # (B,)
    assert torch.allclose(model(x, y), expected, rtol=1e-4, atol=1e-7)
    # the deepest stage (relu5_3) is tapped too
    only_lin4 = {k: (v if k.startswith("lin4") else torch.zeros_like(v)) for k, v in lin.items()}
    torch.save(only_lin4, lin_path + ".lin4")
    assert (LPIPS().load_weights(vgg_path, lin_path + ".lin4")(x, y) > 0).all()


def test_lpips_frozen_eval_and_gradient_reaches_images(lpips_files):
    model = nn.Sequential(LPIPS().load_weights(*lpips_files[:2]))
    model.train()  # a parent in train mode must not switch the heads' Dropout on
    x, y = _images(4).requires_grad_(True), _images(5)
    d1 = model[0](x, y)
    assert torch.equal(d1, model[0](x, y))
    d1.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_reconstruction_loss_l1_lpips_and_disabled_message(lpips_files, capsys):
    target = _images(6) * 2.0  # ImageNet-normalized-like values
    recon = target + 0.5
    plain = ReconstructionLoss()
    msg = capsys.readouterr().out
    assert msg.count("LPIPS disabled") == 1 and "lpips_vgg_path" in msg
    out = plain(recon, target)
    assert out["l1"].item() == pytest.approx(0.5, abs=1e-6)
    assert out["lpips"].item() == 0.0 and out["total"].item() == pytest.approx(0.5, abs=1e-6)
    full = ReconstructionLoss(l1_weight=1.0, lpips_weight=2.0, vgg_path=lpips_files[0], lin_path=lpips_files[1])
    assert "LPIPS disabled" not in capsys.readouterr().out
    out = full(recon, target)
    lp = full.lpips(imagenet_to_unit(recon), imagenet_to_unit(target)).mean()
    assert out["lpips"].item() == pytest.approx(lp.item(), rel=1e-6) and out["lpips"].item() > 0
    assert out["total"].item() == pytest.approx(0.5 + 2.0 * lp.item(), rel=1e-6)


def test_imagenet_to_unit():
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1).expand(1, 3, 3, 1)  # (1, 3, 3, 1) in [0, 1]
    normalized = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    expected = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 3, 1).expand(1, 3, 3, 1)
    assert torch.allclose(imagenet_to_unit(normalized), expected, atol=1e-6)


def test_reconstruction_loss_path_errors(tmp_path, lpips_files):
    with pytest.raises(FileNotFoundError, match="lpips_vgg_path"):
        ReconstructionLoss(vgg_path=str(tmp_path / "missing.pth"), lin_path=lpips_files[1])
    with pytest.raises(ValueError, match="lpips_lin_path"):
        ReconstructionLoss(vgg_path=lpips_files[0])
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="lin1.model.1.weight"):
        ReconstructionLoss(vgg_path=lpips_files[0], lin_path=str(tmp_path / "partial.pth"))


# -----------------------------------------------------------------------------
# Stage-2 GAN


def test_patch_discriminator_shape():
    disc = PatchDiscriminator(channels=16, n_layers=3)
    strides = [m.stride[0] for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert strides == [2, 2, 2, 1, 1]  # 3 strided convs, then stride-1 conv + final conv
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert PatchDiscriminator().main[0].out_channels == 64


def test_hinge_losses_hand_worked():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)


def test_adaptive_gan_weight_on_toy_decoder():
    torch.manual_seed(0)
    first, last = nn.Linear(3, 4), nn.Linear(4, 2, bias=False)  # toy decoder, `last` is its final layer
    h = torch.tanh(first(torch.randn(3)))  # (4,)
    y = last(h)  # (2,)
    a, b = 0.3, 2.0
    rec, adv = a * y.sum(), b * y[0]  # ∇_W rec = a·[1,1]ᵀhᵀ, ∇_W adv = b·[1,0]ᵀhᵀ
    expected = a * math.sqrt(2) * h.norm().item() / (b * h.norm().item() + 1e-4)
    w = adaptive_gan_weight(rec, adv, last.weight, max_weight=1e4)
    assert w.item() == pytest.approx(expected, rel=1e-5) and not w.requires_grad
    # clamped: a vanishing adversarial gradient would blow the ratio up
    assert adaptive_gan_weight(rec, 1e-9 * y[0], last.weight, max_weight=100.0).item() == pytest.approx(100.0)
    # the graph survives for the real backward
    out = gan_generator_loss(rec, y.view(1, 1, 1, 2), last.weight, step=5, gan_weight=0.5, gan_start=5)
    assert out["adaptive_weight"].item() > 0 and out["gan"].item() == pytest.approx(-y.mean().item())  # on at start
    assert out["total"].item() == pytest.approx(rec.item() + 0.5 * out["adaptive_weight"].item() * -y.mean().item(),
                                                rel=1e-5)
    out["total"].backward()
    assert last.weight.grad is not None


def test_gan_weight_is_zero_before_start():
    rec = torch.tensor(1.5, requires_grad=True)
    out = gan_generator_loss(rec, None, None, step=3, gan_weight=0.5, gan_start=4)
    assert out["total"] is rec and out["gan"].item() == 0.0 and out["adaptive_weight"].item() == 0.0


# -----------------------------------------------------------------------------
# Total


def test_vtp_loss_combination_and_ablations():
    t = lambda v: torch.tensor(v)  # noqa: E731
    cfg = LossConfig(lambda_rec=0.1, lambda_ssl=1.0, lambda_clip=1.0, koleo_weight=0.1)
    rec = {"l1": t(0.3), "lpips": t(0.2), "total": t(0.5)}
    out = vtp_loss(cfg, rec=rec, clip=t(2.0), dino=t(3.0), ibot=t(4.0), koleo=t(-1.0))
    assert out["ssl"].item() == pytest.approx(3.0 + 4.0 - 0.1)
    assert out["total"].item() == pytest.approx(0.1 * 0.5 + 6.9 + 2.0)
    assert out["l1"].item() == pytest.approx(0.3) and out["lpips"].item() == pytest.approx(0.2)
    # CLIP+AE ablation: SSL terms are not required and do not appear
    ablation = LossConfig(lambda_rec=0.1, lambda_ssl=0.0, lambda_clip=1.0)
    out = vtp_loss(ablation, rec=t(0.5), clip=t(2.0))
    assert set(out) == {"rec", "clip", "total"} and out["total"].item() == pytest.approx(2.05)
    with pytest.raises(ValueError, match="lambda_ssl"):
        vtp_loss(cfg, rec=rec, clip=t(2.0))
