"""CUDA paths (skipped without a GPU): bf16 and fp16 (GradScaler) steps of stage 1, stage 2 and the DiT, flash
attention in the encoder, and a stage-1 step that never waits on the GPU."""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import losses
import train_dit
from model import VTP, adamw, amp_setup, parse_config
from pretrain import Student, Teacher, forward_backward, optimizer_step, param_groups, stage2_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = ["--encoder.depth=2", "--decoder.depth=1", "--text.depth=1", "--data.batch_size=8",
         "--data.ssl_batch_size=4", "--data.rec_batch_size=4", "--data.num_local_crops=2"]


def batch_on(cfg, device, seed=0):
    """A stage-1 batch from the built-in data (real crops, masks and captions), normalized on the device."""
    import data
    tok = data.build_tokenizer(cfg)
    loader = data.build_pretrain_loader(cfg, tok, 0, 1)
    return data.batch_to_device(next(loader), device)


def test_batch_to_device_on_the_gpu_matches_the_cpu():
    """The uint8 loader batch normalized on the GPU equals the CPU normalization (float32 rounding), without a host
    sync once the device's ImageNet constants exist."""
    import data
    cfg = parse_config(SMALL)
    batch = next(data.build_pretrain_loader(cfg, data.build_tokenizer(cfg), 0, 1))
    assert batch["images"].is_pinned()  # so that non_blocking copies are asynchronous
    cpu = data.batch_to_device(batch, torch.device("cpu"))
    data.batch_to_device(batch, torch.device("cuda"))  # warm-up: the constants are copied once per device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = data.batch_to_device(batch, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for key in ("images", "global_crops", "local_crops", "rec_images"):
        assert gpu[key].is_cuda and gpu[key].dtype == torch.float32
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-6, atol=1e-6)
    assert torch.equal(gpu["mask_indices"].cpu(), batch["mask_indices"])


def stage1_setup(amp):
    cfg = parse_config(SMALL + [f"--run.amp={amp}"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    student = Student(cfg).to(device)
    teacher = Teacher(student).to(device)
    opt = adamw(param_groups(student, 0.05), device, lr=1e-3, betas=cfg.optim.betas, eps=cfg.optim.eps)
    autocast, scaler = amp_setup(cfg.run.amp, device)
    return cfg, device, student, teacher, opt, autocast, scaler


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_stage1_steps(amp):
    cfg, device, student, teacher, opt, autocast, scaler = stage1_setup(amp)
    assert (scaler is not None) == (amp == "fp16")
    assert opt.defaults["fused"]
    batch = batch_on(cfg, device)
    w0 = student.vtp.trunk.blocks[0].attn.qkv.weight.detach().clone()
    t0 = teacher.trunk.blocks[0].attn.qkv.weight.detach().clone()
    for _ in range(3):
        terms = forward_backward(student, teacher, batch, 0.07, cfg, autocast, scaler)
        grad_norm = optimizer_step(student, teacher, opt, scaler, cfg, 0.99)
    assert all(torch.isfinite(v).all() for v in terms.values()) and torch.isfinite(grad_norm)
    assert not torch.equal(w0, student.vtp.trunk.blocks[0].attn.qkv.weight)  # the student trained
    assert not torch.equal(t0, teacher.trunk.blocks[0].attn.qkv.weight)  # and the teacher followed
    if scaler is not None:
        assert scaler.get_scale() > 0
    # the loss in reduced precision stays close to the fp32 loss of the same weights
    with torch.no_grad():
        probs = teacher(batch["global_crops"], batch["mask_indices"], 0.07)
        ref, _ = student(batch, probs)
        with autocast():
            low, _ = student(batch, probs)
    assert low["total"].item() == pytest.approx(ref["total"].item(), rel=0.05)


def test_stage1_step_never_waits_on_the_gpu():
    """bf16 stage-1 step with sync debugging set to error: any host sync (a .item(), boolean indexing, a
    blocking copy) raises."""
    cfg, device, student, teacher, opt, autocast, scaler = stage1_setup("bf16")
    batch = batch_on(cfg, device)
    forward_backward(student, teacher, batch, 0.07, cfg, autocast, scaler)  # warm-up (lazy init may sync)
    optimizer_step(student, teacher, opt, scaler, cfg, 0.99)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(student, teacher, batch, 0.07, cfg, autocast, scaler)
        optimizer_step(student, teacher, opt, scaler, cfg, 0.99)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_encoder_runs_on_flash_attention():
    """In bf16 every encoder and decoder attention can use the flash kernel (sdpa_kernel raises otherwise)."""
    cfg = parse_config(SMALL)
    vtp = VTP(cfg).cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        recon = vtp(x)
        feats = vtp.image_features(x)
    assert recon.shape == x.shape and torch.isfinite(feats).all()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_stage2_step(amp):
    cfg = parse_config(SMALL + [f"--run.amp={amp}", "--loss.gan_start=0"])
    device = torch.device("cuda")
    vtp = VTP(cfg).to(device).requires_grad_(False).eval()
    decoder = vtp.pixel_decoder.requires_grad_(True).train()
    disc = losses.PatchDiscriminator(3, 16, 2).to(device)
    rec_loss = losses.ReconstructionLoss(1.0, 0.0).to(device)
    opt_g, opt_d = (adamw(m.parameters(), device, lr=1e-4) for m in (decoder, disc))
    autocast, scaler = amp_setup(cfg.run.amp, device)
    assert (scaler is not None) == (amp == "fp16")
    enc0, dec0 = vtp.trunk.norm.weight.clone(), decoder.proj_out.weight.detach().clone()
    x = torch.randn(4, 3, 32, 32, device=device)
    for step in range(3):
        terms = stage2_step(vtp, decoder, disc, rec_loss, opt_g, opt_d, scaler, [x[:2], x[2:]], step, cfg, autocast)
    assert {"l1", "gan", "disc", "adaptive_weight"} <= set(terms[0]) and "grad_norm" in terms[-1]
    terms = {k: v for t in terms for k, v in t.items()}
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert torch.equal(enc0, vtp.trunk.norm.weight)  # the encoder is frozen
    assert not torch.equal(dec0, decoder.proj_out.weight)  # the decoder trains


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_dit_step(amp):
    device = torch.device("cuda")
    dit = train_dit.build_dit("tiny", 8, 4, 10).to(device)
    ema = copy.deepcopy(dit).requires_grad_(False)
    opt = adamw(dit.parameters(), device, lr=1e-3)
    ctx, scaler = amp_setup(amp, device)
    fm = train_dit.FlowMatching(10)
    x, y = torch.randn(8, 4, 8, 8, device=device), torch.arange(8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    w0 = dit.blocks[0].attn.qkv.weight.detach().clone()
    for _ in range(30):  # fp16: the GradScaler skips the first steps (inf gradients at scale 2^16) and backs off
        out, grad_norm = train_dit.train_step(dit, dit, ema, fm, opt, scaler, x, y, gen, ctx, 1.0, 0.9)
    assert torch.isfinite(out["loss"]) and torch.isfinite(grad_norm)
    assert not torch.equal(w0, dit.blocks[0].attn.qkv.weight)
    if scaler is not None:
        assert 0 < scaler.get_scale() < 2.0 ** 16  # it did back off
    with ctx():
        z = fm.sample(ema, torch.randn(2, 4, 8, 8, device=device), y[:2], num_steps=4)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
