"""Tests of train_dit.py: DiT init and patchify, flow-matching loss and samplers, latent cache, training resume,
NaN handling, a 2-process gloo run and an end-to-end cache -> train -> sample smoke run."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import Config, ConfigError, DiT_models, NonFiniteLoss, VTP, load_vtp, save_checkpoint
from train_dit import (DiT, FlowMatching, LatentCache, build_dit, denormalize_latents, latent_stats,
                       main, normalize_latents, patchify, prepare_latent_cache, sample_images, shift_time, time_grid,
                       tokenizer_fingerprint, unpatchify)
import train_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: small CPU ops on a shared 2-core machine run faster and steadier than with two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_tokenizer_cfg():
    cfg = Config()
    cfg.encoder.depth = cfg.decoder.depth = cfg.text.depth = 1
    return cfg


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A random tiny VTP checkpoint (stage-1 layout), depth 1 everywhere for speed."""
    torch.manual_seed(0)
    cfg = tiny_tokenizer_cfg()
    path = str(tmp_path_factory.mktemp("tok") / "ckpt_0.pt")
    save_checkpoint(path, {"model": VTP(cfg).state_dict(), "config": cfg.to_dict(), "tokenizer": None, "step": 0,
                           "stage": 1})
    return path


def run_args(tok, out, *extra):
    """Small, fast settings for main(): 64 cached images, batch 8, 3-step sampler, a 2x1 grid, a log every step."""
    return [f"--tokenizer={tok}", f"--dit.out_dir={out}", "--dit.num_cache_images=64", "--dit.stats_images=64",
            "--dit.batch_size=8", "--sample.num_steps=3", "--dit.grid_classes=2", "--dit.grid_per_class=1",
            "--dit.log_every=1", "--dit.sample_every=1000", "--dit.ckpt_every=1000", *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def small_dit(patch_size=1, num_classes=5):
    return DiT(input_size=8, in_channels=4, num_classes=num_classes, patch_size=patch_size, depth=2, width=32,
               num_heads=2)


# --- DiT ---


def test_untrained_dit_outputs_exactly_zero():
    torch.manual_seed(0)
    m = small_dit(patch_size=2)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 4, 5])  # 5 = the null class
    out = m(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    # zero-initialized adaLN: every block is the identity
    h = m.x_embedder(patchify(x, 2))
    c = m.t_embedder(t) + m.y_embedder(y)
    for blk in m.blocks:
        assert torch.equal(blk(h, c, m.rope(4, 4)), h)
    # so at step 0 only the output Linear receives a gradient
    FlowMatching(5).training_losses(m, x, y)["loss"].backward()
    for name, p in m.named_parameters():
        nonzero = p.grad is not None and p.grad.abs().sum() > 0
        assert nonzero == name.startswith("final_layer.linear."), name


def test_dit_presets_and_parameter_counts():
    counts = {}
    for name in DiT_models:
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build_dit(name, 16, 64, 1000).parameters())
    assert 1e6 < counts["tiny"] < 5e6
    assert abs(counts["XL"] / 1e6 - 675.0) < 1.0  # SwiGLU at 2/3 width keeps DiT-XL's 675M
    assert counts["S"] < counts["B"] < counts["L"] < counts["XL"]
    with torch.device("meta"):
        xl = build_dit("XL", 16, 64, 1000)
    assert len(xl.blocks) == 28 and xl.x_embedder.out_features == 1152 and xl.blocks[0].attn.num_heads == 16


@pytest.mark.parametrize("p", [1, 2])
def test_patchify_round_trip(p):
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (8 // p) * (12 // p), p * p * 3)
    assert torch.equal(unpatchify(tokens, p, 8 // p, 12 // p), x)
    # token 1 is the patch right of token 0 (row-major grid), its values ordered (row, col, channel)
    assert torch.equal(tokens[:, 1], x[:, :, :p, p:2 * p].permute(0, 2, 3, 1).reshape(2, -1))


def test_dit_output_depends_on_position_time_and_class():
    torch.manual_seed(0)
    m = small_dit()
    for p in m.parameters():  # leave the zero init so the output is non-trivial
        torch.nn.init.normal_(p, std=0.3)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.3]), torch.tensor([1, 1])
    out = m(x, t, y)
    assert not torch.allclose(m(x, t + 0.2, y), out, atol=1e-3)
    assert not torch.allclose(m(x, t, y + 1), out, atol=1e-3)
    # The position embedding and RoPE each make the map position-aware: with either one alone, permuting the
    # positions does not just permute the output; with neither, it does.
    perm = torch.randperm(64)
    shuffle = lambda z: z.flatten(2)[:, :, perm].view_as(z)  # noqa: E731
    assert not torch.allclose(m(shuffle(x), t, y), shuffle(out), atol=1e-3)
    pos_embed = m.pos_embed.clone()
    m.pos_embed.zero_()  # RoPE only
    assert not torch.allclose(m(shuffle(x), t, y), shuffle(m(x, t, y)), atol=1e-3)
    m.rope.forward = lambda h, w: (torch.zeros(h * w, 16), torch.ones(h * w, 16))  # the identity rotation
    assert torch.allclose(m(shuffle(x), t, y), shuffle(m(x, t, y)), atol=1e-5)  # neither
    m.pos_embed.copy_(pos_embed)  # position embedding only
    assert not torch.allclose(m(shuffle(x), t, y), shuffle(m(x, t, y)), atol=1e-3)


def test_dit_knows_absolute_position():
    """RoPE only encodes offsets between tokens: on a constant input every token would get the same attention
    output, so a RoPE-only DiT cannot tell where in the image a token is (it failed to memorize 8 images, placing
    each object anywhere). The fixed sin-cos position embedding gives each grid cell its own input."""
    torch.manual_seed(0)
    m = small_dit()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, t, y = torch.ones(1, 4, 8, 8), torch.tensor([0.5]), torch.tensor([2])
    out = m(x, t, y).flatten(2)  # (1, C, 64)
    assert (out - out[:, :, :1]).abs().amax() > 1e-2
    m.pos_embed.zero_()
    out = m(x, t, y).flatten(2)
    assert (out - out[:, :, :1]).abs().amax() < 1e-4


def test_sincos_pos_embed():
    pe = train_dit.sincos_pos_embed(16, 3, 5)  # (15, 16): rows use channels 0..7, columns 8..15
    assert pe.shape == (15, 16)
    assert torch.equal(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))  # sin 0, cos 0
    # token 7 is row 1, column 2; the first frequency is 1, so its first row / column channels are sin(1), sin(2)
    assert torch.allclose(pe[7, [0, 4, 8, 12]], torch.tensor([np.sin(1), np.cos(1), np.sin(2), np.cos(2)]).float())
    assert torch.allclose(pe[7, :8], pe[5, :8]) and torch.allclose(pe[7, 8:], pe[2, 8:])  # same row / column
    assert len({tuple(v.tolist()) for v in pe}) == 15  # every cell distinct


# --- flow matching ---


def test_flow_matching_loss_of_exact_velocity_is_zero():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4, 8, 8), torch.randint(0, 3, (64,))
    fm = FlowMatching(3, t_mu=-0.5, t_sigma=1.25, cos_weight=0.5, class_dropout=0.0)

    def oracle(scale):
        # x_t = t*x + (1-t)*eps  =>  the velocity x - eps = (x - x_t) / (1 - t)
        return lambda x_t, t, y_: scale * (x - x_t) / (1 - t).view(-1, 1, 1, 1)

    exact = fm.training_losses(oracle(1.0), x, y, generator=torch.Generator().manual_seed(1))
    assert exact["loss"] < 1e-5 and exact["mse"] < 1e-5 and exact["cos"] < 1e-5
    double = fm.training_losses(oracle(2.0), x, y, generator=torch.Generator().manual_seed(1))
    assert double["cos"].abs() < 1e-5 and double["mse"] > 1.0  # right direction, wrong length
    # a positive length that varies over positions keeps the direction of each channel vector: the cosine, taken
    # over channels at each position, stays 0
    per_position = oracle(torch.rand(1, 1, 8, 8) + 0.1)
    assert fm.training_losses(per_position, x, y, generator=torch.Generator().manual_seed(1))["cos"].abs() < 1e-5
    flipped = fm.training_losses(oracle(-1.0), x, y, generator=torch.Generator().manual_seed(1))
    assert abs(flipped["cos"] - 2.0) < 1e-5
    assert torch.allclose(flipped["loss"], flipped["mse"] + 0.5 * flipped["cos"])


def test_flow_matching_timesteps_and_label_dropout():
    seen = {}

    def record(x_t, t, y):
        seen["t"], seen["y"] = t, y
        return torch.zeros_like(x_t)

    x, y = torch.zeros(20000, 1, 1, 1), torch.zeros(20000, dtype=torch.long)
    FlowMatching(7, t_mu=-0.75, t_sigma=1.0, class_dropout=0.25).training_losses(record, x, y)
    logit = torch.log(seen["t"] / (1 - seen["t"]))
    assert abs(logit.mean() + 0.75) < 0.05 and abs(logit.std() - 1.0) < 0.05  # logit-normal(-0.75, 1)
    dropped = (seen["y"] == 7).float().mean()
    assert abs(dropped - 0.25) < 0.02 and set(seen["y"].tolist()) == {0, 7}


def test_euler_sampling_of_a_linear_flow_is_exact():
    torch.manual_seed(0)
    target, noise, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long)
    fm = FlowMatching(3)
    times = []

    def straight(x, t, y_):  # the flow towards one data point: x(t) moves on a straight line to `target` at t=1
        times.append(t[0].item())
        return (target - x) / (1 - t).view(-1, 1, 1, 1)

    out = fm.sample(straight, noise, y, num_steps=7, sampler="euler", time_shift=0.075)
    assert torch.allclose(out, target, atol=1e-5)
    assert np.allclose(times, time_grid(7, 0.075)[:-1])  # evaluated at the shifted grid, from noise to data
    # Heun (trapezoid) is exact for a velocity linear in t; Euler is not
    a = torch.randn(2, 4, 8, 8)
    ramp = lambda x, t, y_: 2 * t.view(-1, 1, 1, 1) * a  # noqa: E731  x(1) = x(0) + a
    assert torch.allclose(fm.sample(ramp, noise, y, 5, "heun", 0.3), noise + a, atol=1e-5)
    assert not torch.allclose(fm.sample(ramp, noise, y, 5, "euler", 0.3), noise + a, atol=1e-2)


def test_classifier_free_guidance_scale_and_interval():
    fm = FlowMatching(3)
    noise, y = torch.zeros(2, 1, 1, 1), torch.tensor([0, 2])
    v_cond, v_uncond = 1.0, 0.25

    def model(x, t, y_):
        return torch.where(y_ == 3, v_uncond, v_cond).view(-1, 1, 1, 1).expand_as(x).float()

    out = fm.sample(model, noise, y, num_steps=10, time_shift=0.5, cfg_scale=3.0, cfg_interval=(0.0, 0.4))
    ts = time_grid(10, 0.5)
    guided = v_uncond + 3.0 * (v_cond - v_uncond)
    expect = sum((t1 - t0) * (guided if t0 <= 0.4 else v_cond) for t0, t1 in zip(ts[:-1], ts[1:]))
    assert torch.allclose(out, torch.full_like(out, expect), atol=1e-6)
    assert abs(expect - 1.0) > 0.1  # guidance did change the result
    assert torch.allclose(fm.sample(model, noise, y, 10, time_shift=0.5), torch.ones_like(out), atol=1e-6)


def test_time_shift_grid():
    ts = time_grid(250, 0.075)
    assert len(ts) == 251 and ts[0] == 0.0 and ts[-1] == 1.0
    d = np.diff(ts)
    assert (d > 0).all()
    assert d[0] < d[-1] / 100  # s = 0.075 puts the small steps near t = 0 (noise)
    assert abs(shift_time(0.5, 0.075) - 0.0375 / 0.5375) < 1e-12
    assert np.allclose(time_grid(4, 1.0), [0, 0.25, 0.5, 0.75, 1.0])  # s = 1 is the uniform grid


def test_latent_normalization_round_trip():
    torch.manual_seed(0)
    shift, scale = torch.tensor([3.0, -1.0, 0.0, 10.0]), torch.tensor([0.5, 2.0, 1.0, 7.0])
    z = torch.randn(500, 4, 8, 8) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    mean, std = latent_stats(z)
    assert torch.allclose(mean, shift, atol=0.05 * scale.max()) and torch.allclose(std, scale, rtol=0.02)
    zn = normalize_latents(z, mean, std)
    assert torch.allclose(zn.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(zn.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-5)
    assert torch.allclose(denormalize_latents(zn, mean, std), z, atol=1e-5)


# --- training, resume, errors ---


def test_resume_gives_identical_losses_and_parameters(tokenizer, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    main(run_args(tokenizer, a, "--dit.max_steps=4", "--dit.ckpt_every=2"))
    main(run_args(tokenizer, b, "--dit.max_steps=2", "--dit.ckpt_every=2"))
    with open(os.path.join(b, "metrics.jsonl"), "a") as f:  # as if killed after logging step 3, before its ckpt
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    main(run_args(tokenizer, b, "--dit.max_steps=4", "--dit.ckpt_every=2"))  # resumes from ckpt_0000002.pt
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4]
    for key in ("loss", "mse", "cos", "grad_norm"):
        assert [r[key] for r in ma] == [r[key] for r in mb], key
    assert len({r["loss"] for r in ma}) == 4  # the steps do differ
    ca = torch.load(os.path.join(a, "ckpt_0000004.pt"), weights_only=True)
    cb = torch.load(os.path.join(b, "ckpt_0000004.pt"), weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    assert ca["data_position"] == cb["data_position"] == {"epoch": 0, "offset": 32}
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tokenizer, tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    real, calls = FlowMatching.training_losses, []

    def poisoned(self, model, x, y, generator=None):
        calls.append(1)
        losses = real(self, model, x, y, generator)
        if len(calls) >= 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(FlowMatching, "training_losses", poisoned)
    with pytest.raises(NonFiniteLoss, match="'loss' became nan at step 3"):
        main(run_args(tokenizer, out, "--dit.max_steps=6", "--dit.ckpt_every=2", "--dit.log_every=10"))
    ckpts = sorted(n for n in os.listdir(out) if n.startswith("ckpt_"))
    assert ckpts == ["ckpt_0000002.pt"]
    ck = torch.load(os.path.join(out, ckpts[0]), weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_tokenizer_errors_and_cache_rebuild(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="--tokenizer"):
        main([f"--dit.out_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main([f"--tokenizer={tmp_path}/nowhere.pt", f"--dit.out_dir={tmp_path}"])
    # a cache made by another tokenizer is rebuilt; a DiT trained on another tokenizer is refused
    torch.manual_seed(1)
    other = str(tmp_path / "other.pt")
    tcfg = tiny_tokenizer_cfg()
    save_checkpoint(other, {"model": VTP(tcfg).state_dict(), "config": tcfg.to_dict(), "tokenizer": None,
                            "step": 0, "stage": 1})
    out = str(tmp_path / "run")
    main(run_args(tokenizer, out, "--dit.max_steps=1", "--dit.lr=5e-4"))
    assert read_metrics(out)[0]["lr"] == 5e-4  # an explicit lr overrides the preset's
    cfg = train_dit.parse_config(run_args(other, out), aliases=train_dit.ALIASES)
    vtp, tok_cfg, _ = load_vtp(other)
    fp = tokenizer_fingerprint(vtp)
    assert fp != tokenizer_fingerprint(load_vtp(tokenizer)[0])
    cache = prepare_latent_cache(cfg, vtp, tok_cfg, fp, 0, 1, torch.device("cpu"), contextlib.nullcontext)
    with open(os.path.join(out, "latents", "meta.json")) as f:
        assert json.load(f)["fingerprint"] == fp
    images = next(iter(train_dit.build_eval_loader(cfg, "train", 32, 4)))["images"]
    with torch.no_grad():
        assert torch.allclose(cache.gather(torch.arange(4), torch.zeros(4, dtype=torch.bool)), vtp.encode(images),
                              atol=1e-5)
    with pytest.raises(ValueError, match="fingerprint"):
        main(run_args(other, out, "--dit.max_steps=2"))


def test_sampling_uses_the_tokenizer_file_the_dit_was_trained_on(tokenizer, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tokenizer, folder / "ckpt_0000000.pt")
    out = str(tmp_path / "run")
    main(run_args(str(folder), out, "--dit.max_steps=1"))
    ref, _ = sample_images(out, 2, num_steps=2)
    # a later stage-1 checkpoint in the folder (another encoder) does not change what the DiT decodes with
    torch.manual_seed(5)
    tcfg = tiny_tokenizer_cfg()
    save_checkpoint(str(folder / "ckpt_0000100.pt"), {"model": VTP(tcfg).state_dict(), "config": tcfg.to_dict(),
                                                      "tokenizer": None, "step": 100, "stage": 1})
    assert np.array_equal(sample_images(out, 2, num_steps=2)[0], ref)
    os.remove(folder / "ckpt_0000000.pt")
    with pytest.raises(FileNotFoundError, match="fingerprint"):
        sample_images(out, 2, num_steps=2)


def test_cache_of_an_imagenet_style_folder(tokenizer, tmp_path):
    from PIL import Image
    root = tmp_path / "imagenet"
    g = np.random.default_rng(0)
    for c, name in enumerate(["n01_cat", "n02_dog", "n03_fox"]):
        (root / name).mkdir(parents=True)
        for i in range(2 + c):  # 2, 3, 4 images of sizes that need the ADM centre crop
            Image.fromarray(g.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
            (root / name / f"{i}.txt").write_text("a caption, for the unlabelled folder reader below")
    out = str(tmp_path / "run")
    cfg = train_dit.parse_config(run_args(tokenizer, out, "--data.dataset=imagenet", f"--data.path={root}",
                                          "--dit.shard_size=4", "--dit.batch_size=2"), aliases=train_dit.ALIASES)
    assert train_dit.dataset_num_classes(cfg) == 3
    vtp, tok_cfg, _ = load_vtp(tokenizer)
    cache = prepare_latent_cache(cfg, vtp, tok_cfg, tokenizer_fingerprint(vtp), 0, 1, torch.device("cpu"),
                                 contextlib.nullcontext)
    assert len(cache) == 9 and sorted(cache.labels.tolist()) == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert [len(z) for z in cache.latents] == [4, 4, 1]  # shard_size images per shard file
    pos, flip = torch.arange(9), torch.ones(9, dtype=torch.bool)
    orig, flipped = cache.gather(pos, ~flip), cache.gather(pos, flip)
    assert flipped.shape == (9, 4, 8, 8) and not torch.allclose(flipped, orig)
    assert torch.equal(cache.gather(pos.flip(0), ~flip), orig.flip(0))  # gather across shards keeps the order
    unlabelled = train_dit.parse_config(["--data.dataset=folder", f"--data.path={root}"])
    with pytest.raises(ConfigError, match="labelled"):
        train_dit.dataset_num_classes(unlabelled)


# --- end to end ---


def test_smoke_cache_train_sample(tokenizer, tmp_path, capsys):
    out = str(tmp_path / "dit")
    main(run_args(tokenizer, out, "--dit.max_steps=3", "--dit.grid_classes=3", "--dit.grid_per_class=2"))
    # the cache: each image and its flip, labels, statistics, and who made it
    cache = LatentCache(os.path.join(out, "latents"))
    shard = torch.load(os.path.join(out, "latents", "shard_0_0.pt"), weights_only=True)
    assert shard["latents"].shape == (64, 2, 4, 8, 8) and len(cache) == 64
    with open(os.path.join(out, "latents", "meta.json")) as f:
        meta = json.load(f)
    vtp = load_vtp(tokenizer)[0]
    assert meta["tokenizer"] == os.path.abspath(tokenizer) and meta["fingerprint"] == tokenizer_fingerprint(vtp)
    images = next(iter(train_dit.build_eval_loader(Config(), "train", 32, 4)))["images"]
    with torch.no_grad():
        assert torch.allclose(shard["latents"][:4, 0], vtp.encode(images), atol=1e-5)
        assert torch.allclose(shard["latents"][:4, 1], vtp.encode(images.flip(-1)), atol=1e-5)
    mean, std = latent_stats(shard["latents"][:, 0])
    assert torch.allclose(cache.mean, mean) and torch.allclose(cache.std, std)
    # training outputs: log fields, the sample grid (3 classes x 2), the checkpoint
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"loss", "mse", "cos", "lr", "grad_norm", "ms_per_step", "img_per_s"}
    assert rows[0]["lr"] == DiT_models["tiny"]["lr"] == 1e-3  # dit.lr = 0 means the preset's lr
    from PIL import Image
    assert Image.open(os.path.join(out, "samples_0000003.png")).size == (2 * 128, 3 * 128)  # 32 px enlarged 4x
    # a second run reuses the cache
    mtime = os.path.getmtime(os.path.join(out, "latents", "shard_0_0.pt"))
    capsys.readouterr()
    main(run_args(tokenizer, out, "--dit.max_steps=3"))
    assert "reusing" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "latents", "shard_0_0.pt")) == mtime
    # sampling: this rank's share, global indices, independent of the number of processes
    imgs, idx = sample_images(out, 9, seed=3, batch_size=4, num_steps=3)
    assert imgs.shape == (9, 32, 32, 3) and imgs.dtype == np.uint8 and idx.tolist() == list(range(9))
    assert not np.array_equal(imgs[0], imgs[8])  # same class (8 classes cycle), different noise
    share, sidx = sample_images(out, 9, seed=3, batch_size=3, num_steps=3, rank=1, world_size=2)
    assert sidx.tolist() == [1, 3, 5, 7] and np.abs(share.astype(int) - imgs[1::2].astype(int)).max() <= 1
    other, _ = sample_images(out, 2, seed=4, num_steps=3)
    assert not np.array_equal(other, imgs[:2])
    # the CLI: PNGs + samples.npz
    npz = main(["sample", f"--dit.out_dir={out}", "--sample.num_samples=3", "--sample.num_steps=3", "--run.seed=3"])
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (3, 32, 32, 3) and np.abs(arr.astype(int) - imgs[:3].astype(int)).max() <= 1
    assert sorted(n for n in os.listdir(os.path.dirname(npz)) if n.endswith(".png")) == [
        "000000.png", "000001.png", "000002.png"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(ROOT, "train_dit.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_two_process_gloo_run(tokenizer, tmp_path):
    out = str(tmp_path / "ddp")
    r = _torchrun(run_args(tokenizer, out, "--dit.max_steps=3", "--run.device=cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "terminate called" not in r.stderr
    names = sorted(os.listdir(os.path.join(out, "latents")))
    assert "shard_0_0.pt" in names and "shard_1_0.pt" in names  # each rank encoded its share
    cache = LatentCache(os.path.join(out, "latents"))
    assert sorted(cache.index.tolist()) == list(range(64))
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3]  # one log (rank 0), averaged over ranks
    ck = torch.load(os.path.join(out, "ckpt_0000003.pt"), weights_only=True)
    assert ck["rng"]["world_size"] == 2 and ck["data_position"] == {"epoch": 0, "offset": 48}
    # 2-process sampling writes the same images as one process
    r = _torchrun(["sample", f"--dit.out_dir={out}", "--sample.num_samples=5", "--sample.num_steps=3",
                   "--run.device=cpu"])
    assert r.returncode == 0 and "terminate called" not in r.stderr, r.stderr[-3000:]
    arr = np.load(os.path.join(out, "samples", "samples.npz"))["arr_0"]
    ref, _ = sample_images(out, 5, num_steps=3)
    assert arr.shape == (5, 32, 32, 3) and np.abs(arr.astype(int) - ref.astype(int)).max() <= 1
