"""
Gradient accumulation gives the gradient of one big batch (README Method §6): k micro-batches of B through
`pretrain.accumulate_gradients` against one batch of k*B through `pretrain.forward_backward`, for each objective,
and across 2 gloo processes. Plain accumulation (the loss of each micro-batch on its own, divided by k) is computed
beside it and must differ for every batch-coupled objective, so each test would catch it.
Stochastic depth is off (the two runs would draw it differently); KoLeo is off where the parity is exact (its
nearest neighbours are searched within each micro-batch, as within each GPU's batch in DINOv2).
"""

import contextlib
import functools
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import pretrain  # noqa: E402
from model import cleanup_distributed, parse_config, seeded  # noqa: E402

SMALL = ["--encoder.depth=1", "--decoder.depth=1", "--text.depth=1", "--encoder.width=64", "--decoder.width=64",
         "--encoder.num_heads=2", "--decoder.num_heads=2", "--text.width=64", "--text.embed_dim=64",
         "--text.vocab_size=300", "--text.context_length=24", "--head.hidden_dim=64", "--head.bottleneck_dim=32",
         "--head.num_prototypes=64", "--data.batch_size=6", "--data.ssl_batch_size=3", "--data.rec_batch_size=2",
         "--data.num_local_crops=2", "--encoder.drop_path_clip=0", "--encoder.drop_path_ssl=0",
         "--encoder.drop_path_rec=0", "--loss.koleo_weight=0", "--run.device=cpu", "--run.amp=fp32",
         "--data.num_workers=0"]
K = 4
TEMP = 0.05


@functools.lru_cache(maxsize=1)
def tokenizer():
    return data.build_tokenizer(parse_config(SMALL))


def micro_batches(cfg, k=K):
    """k consecutive loader batches of the built-in data (each with its own SSL / reconstruction subsets and masks)."""
    loader = data.build_pretrain_loader(cfg, tokenizer())
    return [next(loader) for _ in range(k)]


def union(batches):
    """The one batch the micro-batches make together: every image and caption, the SSL crops and masks in the
    batch's crop-major layout, the iBOT token list rebuilt for the merged masks, the reconstruction images."""
    dev = [data.batch_to_device(b, "cpu") for b in batches]

    def crop_major(key, n_crops):  # (n_crops*b, ...) per micro-batch -> (n_crops*sum(b), ...)
        parts = [d[key].reshape(n_crops, -1, *d[key].shape[1:]) for d in dev]
        return torch.cat(parts, dim=1).flatten(0, 1)

    n_local = dev[0]["local_crops"].shape[0] // (dev[0]["global_crops"].shape[0] // 2)
    masks = crop_major("masks", 2)
    indices, weight = data.padded_mask_indices(masks, sum(d["mask_indices"].shape[0] for d in dev))
    return {"images": torch.cat([d["images"] for d in dev]), "tokens": torch.cat([d["tokens"] for d in dev]),
            "global_crops": crop_major("global_crops", 2), "local_crops": crop_major("local_crops", n_local),
            "masks": masks, "mask_indices": indices, "mask_weight": weight,
            "rec_images": torch.cat([d["rec_images"] for d in dev])}


def fresh(cfg, rank=0, world_size=1):
    with seeded(0):
        student = pretrain.Student(cfg, rank, world_size)
    return student, pretrain.Teacher(student)


def grads(student):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in student.parameters() if p.requires_grad])


def big_batch_step(cfg, batches):
    student, teacher = fresh(cfg)
    terms = pretrain.forward_backward(student, teacher, union(batches), TEMP, cfg, contextlib.nullcontext, None)
    return grads(student), terms, teacher


def accumulated_step(cfg, batches):
    student, teacher = fresh(cfg)
    terms = pretrain.accumulate_gradients(student, student, teacher, batches, TEMP, cfg, contextlib.nullcontext, None,
                                          lambda j: None, torch.device("cpu"))
    return grads(student), terms, teacher


def plain_accumulation(cfg, batches):
    """What accumulation did before: each micro-batch's loss on its own, its gradient divided by k."""
    student, teacher = fresh(cfg)
    for b in batches:
        pretrain.forward_backward(student, teacher, data.batch_to_device(b, "cpu"), TEMP, cfg, contextlib.nullcontext,
                                  None)
    return grads(student) / len(batches)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_parity(*flags, plain_exact=False):
    cfg = parse_config(SMALL + list(flags))
    batches = micro_batches(cfg)
    g_big, t_big, teacher_big = big_batch_step(cfg, batches)
    g_acc, t_acc, teacher_acc = accumulated_step(cfg, batches)
    assert g_big.norm() > 0
    assert rel(g_acc, g_big) < 1e-5
    for key in t_big:  # the logged terms: the mean over micro-steps is the big batch's loss
        if key.startswith("ent_") or key == "koleo":
            continue
        mean = sum(t[key].detach() for t in t_acc) / len(t_acc)
        assert float(mean) == pytest.approx(float(t_big[key].detach()), rel=1e-5, abs=1e-7), key
    for a, b in zip(teacher_acc.buffers(), teacher_big.buffers()):  # the centre moved once, by the same batch mean
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    plain = rel(plain_accumulation(cfg, batches), g_big)
    assert plain < 1e-5 if plain_exact else plain > 1e-3
    return cfg


def test_clip_is_the_big_batch_through_cached_gradients():
    check_parity("--loss.lambda_ssl=0", "--loss.lambda_rec=0")


def test_ssl_with_sinkhorn_knopp_is_the_big_batch():
    check_parity("--loss.lambda_clip=0", "--loss.lambda_rec=0", "--loss.teacher_norm=sinkhorn")


def test_ssl_with_centering_is_the_big_batch():
    cfg = check_parity("--loss.lambda_clip=0", "--loss.lambda_rec=0", "--loss.teacher_norm=centering")
    assert cfg.loss.teacher_norm == "centering"


def test_reconstruction_is_the_big_batch():
    # a mean over images of equal micro-batches: plain accumulation was exact here already, and stays so
    check_parity("--loss.lambda_clip=0", "--loss.lambda_ssl=0", plain_exact=True)


def test_full_vtp_loss_is_the_big_batch():
    check_parity("--loss.teacher_norm=sinkhorn")


def test_koleo_is_per_micro_batch():
    # KoLeo's neighbours are searched within each micro-batch: the one term that is not the big batch's (documented)
    cfg = parse_config(SMALL + ["--loss.lambda_clip=0", "--loss.lambda_rec=0", "--loss.koleo_weight=1"])
    batches = micro_batches(cfg)
    assert rel(accumulated_step(cfg, batches)[0], big_batch_step(cfg, batches)[0]) > 1e-4


def test_a_step_with_stochastic_depth_runs_and_redraws_the_same_depth():
    # the cached CLIP pass and the student's pass draw stochastic depth from the same fresh generator: with them
    # and SSL/reconstruction off, the cached gradient is exact, so the accumulation equals the big batch only if the
    # two passes dropped the same blocks (here: a big batch of one micro-batch)
    cfg = parse_config(SMALL + ["--loss.lambda_ssl=0", "--loss.lambda_rec=0", "--encoder.drop_path_clip=0.5"])
    batch = micro_batches(cfg, 1)
    student, teacher = fresh(cfg)
    pretrain.forward_backward(student, teacher, data.batch_to_device(batch[0], "cpu"), TEMP, cfg,
                              contextlib.nullcontext, None, torch.Generator().manual_seed(7))
    g_big = grads(student)
    student, teacher = fresh(cfg)
    pretrain.accumulate_gradients(student, student, teacher, batch, TEMP, cfg, contextlib.nullcontext, None,
                                  lambda j: torch.Generator().manual_seed(7), torch.device("cpu"))
    assert rel(grads(student), g_big) < 1e-5


def _ddp_worker(rank, world_size, init_file, runs, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for name, (flags, batches) in runs.items():
            cfg = parse_config(SMALL + flags)
            student, teacher = fresh(cfg, rank, world_size)
            model = torch.nn.parallel.DistributedDataParallel(student)
            mine = batches[rank * len(batches) // world_size:(rank + 1) * len(batches) // world_size]
            terms = pretrain.accumulate_gradients(model, student, teacher, mine, TEMP, cfg, contextlib.nullcontext,
                                                  None, lambda j: None, torch.device("cpu"))
            torch.save({"grads": grads(student), "clip": terms[0]["clip"].detach(),
                        "center": teacher.center_cls.center}, f"{out}.{name}.{rank}")
            del model
        dist.barrier()
    finally:
        cleanup_distributed()


def test_two_gloo_processes_accumulating_are_the_big_batch(tmp_path):
    # 2 processes x 2 micro-steps of 6 pairs = one step on the 24 pairs: CLIP gathered across processes and
    # micro-steps, teacher targets normalized over both, iBOT over all masked crops, DDP's gradient average
    runs = {}
    for norm in ("sinkhorn", "centering"):
        flags = [f"--loss.teacher_norm={norm}", "--train.accum_steps=2"]
        runs[norm] = (flags, micro_batches(parse_config(SMALL + flags)))
        # each process divides iBOT by its own masked crops (as each GPU does): the batches have the same number
        assert len({int((b["masks"].sum(1) > 0).sum()) for b in runs[norm][1]}) == 1
    out = str(tmp_path / "out")
    with tempfile.NamedTemporaryFile(dir=tmp_path, delete=False) as f:
        init_file = f.name
    os.remove(init_file)
    mp.spawn(_ddp_worker, args=(2, init_file, runs, out), nprocs=2, join=True)
    for norm, (flags, batches) in runs.items():
        ranks = [torch.load(f"{out}.{norm}.{r}", weights_only=True) for r in range(2)]
        cfg = parse_config(SMALL + flags)
        g_big, t_big, teacher_big = big_batch_step(cfg, batches)
        for r in ranks:  # DDP's averaged gradient and the centre are the same on both, and the big batch's
            assert rel(r["grads"], g_big) < 1e-5, norm
            torch.testing.assert_close(r["center"], teacher_big.center_cls.center, rtol=1e-5, atol=1e-7)
        # each process's CLIP value covers its rows of the 24 x 24 logits; their mean is the big batch's loss
        assert float(sum(r["clip"] for r in ranks)) / 2 == pytest.approx(float(t_big["clip"].detach()), rel=1e-5)
        assert rel(plain_accumulation(cfg, batches), g_big) > 1e-3


def test_stage2_accumulation_is_the_big_batch_but_for_the_adaptive_gan_weight():
    # L1 (+ LPIPS) and the discriminator's hinge loss are means over images: 2 micro-batches of 3 give the step of
    # the 6 images. The adaptive GAN weight is a ratio of gradient norms, computed per micro-batch (as per GPU).
    import losses
    from model import VTP, adamw

    cfg = parse_config(SMALL + ["--loss.gan_start=1", "--optim.eps=1.0"])  # step 0 without GAN, step 1 with
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def two_steps(xs):
        with seeded(0):
            vtp = VTP(cfg).requires_grad_(False).eval()
            disc = losses.PatchDiscriminator(3, 8, 2)
        decoder = vtp.pixel_decoder.requires_grad_(True).train()
        rec_loss = losses.ReconstructionLoss(1.0, 0.0)
        opt_g, opt_d = (adamw(m.parameters(), torch.device("cpu"), lr=0.1, eps=1.0) for m in (decoder, disc))
        after = []
        for step in range(2):
            pretrain.stage2_step(vtp, decoder, disc, rec_loss, opt_g, opt_d, None, xs, step, cfg,
                                 contextlib.nullcontext)
            after.append((torch.cat([p.flatten() for p in decoder.parameters()]),
                          torch.cat([p.flatten() for p in disc.parameters()])))
        return after

    (dec_big, disc_big), (dec_big2, disc_big2) = two_steps([x])
    (dec_acc, disc_acc), (dec_acc2, disc_acc2) = two_steps([x[:3], x[3:]])
    torch.testing.assert_close(dec_acc, dec_big, rtol=1e-5, atol=1e-6)  # step 0: L1 alone, exact
    torch.testing.assert_close(disc_acc2, disc_big2, rtol=1e-5, atol=1e-6)  # step 1: the discriminator, exact
    assert not torch.allclose(dec_acc2, dec_big2, rtol=1e-5, atol=1e-6)  # the adaptive weight: per micro-batch


def test_a_micro_batch_too_small_for_koleo_fails_at_start_up():
    from model import ConfigError

    with pytest.raises(ConfigError, match="data.ssl_batch_size=1: must be >= 2 with KoLeo on"):
        parse_config(["--data.ssl_batch_size=1", "--train.accum_steps=4"])
    parse_config(["--data.ssl_batch_size=1", "--loss.koleo_weight=0"])  # without KoLeo one image is enough
