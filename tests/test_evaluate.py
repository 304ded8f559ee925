"""Tests of evaluate.py: hand-worked metric values, the FID Inception layout, the probes, and every subcommand."""

import json
import math
import os
import socket
import shutil
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import evaluate as ev

# -----------------------------------------------------------------------------
# Fréchet distance, statistics, Inception Score


def _random_cov(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_identical_is_zero():
    mu, sigma = np.arange(6, dtype=np.float64), _random_cov(6, 0)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 2.0, size=5), rng.uniform(0.1, 2.0, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_same_covariance_is_mean_distance_and_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.normal(size=4), rng.normal(size=4), _random_cov(4, 3), _random_cov(4, 4)
    assert ev.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-7)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ev.frechet_distance(mu2, s2, mu1, s1), rel=1e-7)
    assert ev.frechet_distance(mu1, s1, mu2, s2) > 0


def test_frechet_singular_covariances_are_finite():
    # 3 samples in 8 dimensions: rank-deficient covariances, the case the eps*I retry exists for.
    rng = np.random.default_rng(5)
    m1, s1 = ev.feature_statistics(rng.normal(size=(3, 8)))
    m2, s2 = ev.feature_statistics(rng.normal(size=(3, 8)) + 1.0)
    d = ev.frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(d) and d > 0


def test_frechet_eps_retry_and_imaginary_check(monkeypatch):
    real_sqrtm, calls = ev.scipy.linalg.sqrtm, []
    sigma, eps = _random_cov(4, 6), 1e-3

    def failing_once(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(ev.scipy.linalg, "sqrtm", failing_once)
    d = ev.frechet_distance(np.zeros(4), sigma, np.zeros(4), sigma, eps=eps)
    offset = sigma + eps * np.eye(4)
    assert len(calls) == 2 and np.allclose(calls[1], offset @ offset)
    assert d == pytest.approx(-2 * eps * 4, rel=1e-6)  # tr(S) + tr(S) - 2 tr(S + eps I)
    # Imaginary round-off on the diagonal is dropped; a large imaginary part raises.
    monkeypatch.setattr(ev.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-5j * np.eye(4))
    assert ev.frechet_distance(np.zeros(4), sigma, np.ones(4), sigma) == pytest.approx(4.0, rel=1e-7)
    monkeypatch.setattr(ev.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-2j * np.eye(4))
    with pytest.raises(ValueError, match="imaginary"):
        ev.frechet_distance(np.zeros(4), sigma, np.ones(4), sigma)


def test_statistics_round_trip(tmp_path):
    feats = torch.randn(50, 7)
    mu, sigma = ev.feature_statistics(feats)
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False))
    path = str(tmp_path / "stats.npz")
    ev.save_statistics(path, mu, sigma, space="test")
    mu2, sigma2 = ev.load_statistics(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)


def test_inception_score_known_values():
    # Uniform predictions: p(y|x) = p(y), KL = 0, IS = 1.
    assert ev.inception_score(torch.zeros(20, 1008), splits=2)[0] == pytest.approx(1.0)
    # Confident predictions spread evenly over 10 classes: IS = 10.
    logits = torch.full((40, 1008), -1e4)
    logits[torch.arange(40), torch.arange(40) % 10] = 0.0
    assert ev.inception_score(logits, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


# -----------------------------------------------------------------------------
# FID Inception-v3: layout of pt_inception-2015-12-05-6726825d.pth, forward, strict loading

INCEPTION_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.bn.weight": (64,),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch3x3dbl_3.bn.running_var": (96,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3.conv.weight": (192, 128, 7, 1),
    "Mixed_6c.branch7x7dbl_1.conv.weight": (160, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_3b.bn.bias": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return ev.FIDInceptionV3().eval()


@pytest.fixture(scope="module")
def inception_file(inception, tmp_path_factory):
    """The random network saved like the converted TF file: same names, no num_batches_tracked counters."""
    sd = {k: v.clone() for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["Mixed_6b.branch7x7_2.conv.weight"].fill_(0.5)
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(sd, path)
    return path


def test_inception_layout_matches_the_fid_weights_file(inception):
    sd = inception.state_dict()
    for name, shape in INCEPTION_SHAPES.items():
        assert tuple(sd[name].shape) == shape, name
    assert not any("AuxLogits" in k for k in sd)  # the FID network has no auxiliary head
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960
    # parameters + BatchNorm running means and variances: every float tensor of the weights file
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == 23_885_392
    bns = [m for m in inception.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 0.001 for m in bns)


def test_inception_fid_pooling_variants(inception):
    # Average pools exclude the padding: a constant image stays constant at the border.
    ones = torch.ones(1, 2, 5, 5)
    assert torch.allclose(ev._avg_pool_no_pad(ones), ones)
    # Mixed_7b's pool branch averages, Mixed_7c's takes the max (the FID variants E_1 and E_2).
    x = torch.randn(1, 2048, 8, 8)
    with torch.no_grad():
        out = inception.Mixed_7c(x)[:, -192:]
        want = inception.Mixed_7c.branch_pool(F.max_pool2d(x, 3, stride=1, padding=1))
        assert torch.allclose(out, want, atol=1e-5)
        x = torch.randn(1, 1280, 8, 8)
        out = inception.Mixed_7b(x)[:, -192:]
        want = inception.Mixed_7b.branch_pool(ev._avg_pool_no_pad(x))
        assert torch.allclose(out, want, atol=1e-5)


def test_inception_forward_is_2048d(inception):
    seen = []
    hook = inception.Conv2d_1a_3x3.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        pool, logits = inception(torch.rand(1, 3, 64, 64))
    hook.remove()
    # The stem sees 299x299 images in [-1, 1]: [0, 1] inputs are resized and mapped by 2x - 1.
    assert seen[0].shape == (1, 3, 299, 299) and seen[0].min() < -0.9 and seen[0].max() > 0.9
    assert seen[0].abs().max() <= 1.0
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(pool).all() and (pool >= 0).all()  # pool3 follows a ReLU
    assert torch.allclose(logits, pool @ inception.fc.weight.t(), atol=1e-4)


def test_inception_strict_loading(inception_file, tmp_path):
    net = ev.load_fid_inception(inception_file)
    assert not net.training
    assert (net.state_dict()["Mixed_6b.branch7x7_2.conv.weight"] == 0.5).all()
    partial = str(tmp_path / "partial.pth")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, partial)
    with pytest.raises(RuntimeError, match="Missing key"):
        ev.load_fid_inception(partial)


# -----------------------------------------------------------------------------
# PSNR / SSIM


def test_psnr_identical_and_known_noise():
    x = torch.full((2, 3, 16, 16), 128 / 255)
    assert torch.isinf(ev.psnr(x, x)).all()
    sign = torch.where(torch.rand(2, 3, 16, 16) < 0.5, -1.0, 1.0)
    y = x + sign * 10 / 255  # every pixel off by 10 levels: MSE = (10/255)^2
    expected = 20 * math.log10(255 / 10)
    assert torch.allclose(ev.psnr(x, ev.quantize(y)), torch.full((2,), expected, dtype=torch.float64), atol=1e-6)


def test_quantize_rounds_to_8_bit_levels():
    x = torch.tensor([-0.2, 0.4 / 255, 0.6 / 255, 100.49 / 255, 1.3])
    assert torch.equal(ev.quantize(x) * 255, torch.tensor([0.0, 0.0, 1.0, 100.0, 255.0]))


def test_ssim_identical_constant_and_noise():
    x = torch.rand(2, 3, 24, 24)
    assert torch.allclose(ev.ssim(x, x), torch.ones(2, dtype=torch.float64))
    # Constant images: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.3, 0.6, 0.01 ** 2
    s = ev.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert (ev.ssim(x, noisy) < 0.9).all()


def test_gaussian_window():
    w = ev.gaussian_window(11, 1.5)
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max() and w[5, 4] / w[5, 5] == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)))


# -----------------------------------------------------------------------------
# Zero-shot, linear probe, k-NN


class _FakeTokenizer:
    """Token 0 = index of the class name in the prompt, token 1 = index of the template."""

    def __init__(self, names, templates):
        self.names, self.templates = names, templates

    def __call__(self, texts):
        rows = []
        for t in texts:
            c = next(i for i, n in enumerate(self.names) if n in t)
            k = next(i for i, tpl in enumerate(self.templates) if tpl.format(self.names[c]) == t)
            rows.append([c, k])
        return torch.tensor(rows)


class _FakeCLIP:
    """text feature of (class c, template k) = normalize(e_c + (-1)^k e_3); image features are the inputs."""

    def text_features(self, tokens, normalize=True):
        f = F.one_hot(tokens[:, 0], 4).float()
        f[:, 3] = torch.where(tokens[:, 1] % 2 == 0, 1.0, -1.0)
        return F.normalize(f, dim=-1)

    def image_features(self, images, normalize=True):
        return F.normalize(images, dim=-1)


def test_zero_shot_classifier_averages_templates_and_renormalizes():
    names, templates = ["circle", "square", "triangle"], ["a {}.", "a {} shape.", "a drawing of a {}.", "a big {}."]
    w = ev.zero_shot_classifier(_FakeCLIP(), _FakeTokenizer(names, templates), names, templates)
    # The template directions cancel in the mean; after renormalization each class weight is e_c exactly.
    assert torch.allclose(w, torch.eye(4)[:, :3], atol=1e-6)
    images = torch.tensor([[0.1, 0.9, 0.0, 0.3], [0.0, 0.2, 0.8, -0.5], [0.9, 0.5, 0.4, 0.0]])
    logits = _FakeCLIP().image_features(images) @ w
    acc = ev.topk_accuracy(logits, torch.tensor([1, 2, 1]), ks=(1, 2))
    assert acc["top1"] == pytest.approx(200 / 3) and acc["top2"] == pytest.approx(100.0)


def test_templates():
    assert len(ev.CLIP_TEMPLATES) == 80 and len(set(ev.CLIP_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in ev.CLIP_TEMPLATES + ev.SIMPLE_TEMPLATES)


def _blobs(n_per_class, num_classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 4
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(len(y), dim, generator=g), y


def test_linear_probe_separable_features():
    tx, ty = _blobs(40, 4, 16, 0)
    vx, vy = _blobs(10, 4, 16, 1)
    res = ev.linear_probe(tx, ty, vx, vy, 4, lrs=(0.01, 0.1), epochs=10, batch_size=32)
    assert res["top1"] == 100.0 and res["best_lr"] in (0.01, 0.1)
    assert set(res["per_lr"]) == {"0.01", "0.1"}


def test_linear_probe_picks_the_working_learning_rate():
    tx, ty = _blobs(40, 4, 16, 0)
    vx, vy = _blobs(10, 4, 16, 1)
    res = ev.linear_probe(tx, ty, vx, vy, 4, lrs=(0.0, 0.1), epochs=10, batch_size=32)
    assert res["per_lr"]["0.0"] < 100.0  # an untrained (zero) head ties every class
    assert res["best_lr"] == 0.1 and res["per_lr"]["0.1"] == 100.0


def test_knn_is_similarity_weighted():
    # Three neighbours of class 0 at cosine 0.5, one of class 1 at cosine 1: majority says 0, DINO weighting says 1.
    q = torch.tensor([[1.0, 0.0, 0.0]])
    c = math.cos(math.pi / 3)
    s = math.sin(math.pi / 3)
    train = torch.tensor([[1.0, 0.0, 0.0], [c, s, 0.0], [c, -s, 0.0], [c, 0.0, s], [-1.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 0, 2])
    votes = ev.knn_classify(train, labels, q, 3, k=4)
    assert votes.argmax().item() == 1
    assert votes[0, 2] == 0  # the 5th point is not among the k = 4 neighbours
    assert votes[0, 0].item() == pytest.approx(3 * math.exp(0.5 / 0.07), rel=1e-4)


# -----------------------------------------------------------------------------
# gather_cat: no-op in one process, ordered concatenation across two gloo processes


def test_gather_cat_single_process_is_identity():
    x = torch.randn(3, 2)
    assert ev.gather_cat(x) is x


def _gather_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.full((rank + 1, 2), float(rank))  # rank 0 has 1 row, rank 1 has 2
    out[rank] = ev.gather_cat(x).tolist()
    dist.destroy_process_group()


def test_gather_cat_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(2, port, out), nprocs=2)
    assert out[0] == out[1] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


# -----------------------------------------------------------------------------
# End to end: every subcommand on a tiny random checkpoint and the built-in data

from model import Config, ConfigError, VTP, save_checkpoint  # noqa: E402

JUDGE_DIR = os.path.join(tempfile.mkdtemp(prefix="vtp_test_judge_"))  # never the repository's runs/judge
SMALL = ["--eval.num_images=16", "--eval.batch_size=8", "--eval.probe_epochs=3", "--eval.probe_lrs=0.1",
         "--eval.judge_images=64", "--eval.judge_epochs=1", f"--eval.judge_dir={JUDGE_DIR}"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny VTP (depth 1 everywhere) saved like pretrain.py does, in a run folder."""
    from data import build_tokenizer

    cfg = Config()
    cfg.encoder.depth = cfg.decoder.depth = cfg.text.depth = 1
    torch.manual_seed(0)
    vtp = VTP(cfg)
    folder = tmp_path_factory.mktemp("pretrain")
    save_checkpoint(str(folder / "ckpt_3.pt"), {"model": vtp.state_dict(), "config": cfg.to_dict(),
                                                "tokenizer": build_tokenizer(cfg).state_dict(), "step": 3, "stage": 1})
    return str(folder)


def _real_images(n, size=32):
    """The first n built-in train images as uint8 (n, size, size, 3), exactly as the reference statistics see them."""
    from data import build_eval_loader, denormalize

    batch = next(iter(build_eval_loader(Config(), "train", size, n, max_images=n)))
    return (ev.quantize(denormalize(batch["images"])) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def test_cli_all_without_dit_skips_gen(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "res.json")
    res = ev.main(["all", f"--ckpt={tiny_ckpt}", f"--eval.out={out}"] + SMALL)
    printed = capsys.readouterr().out
    assert "gen skipped" in printed and "FD_vtp" in printed and "NOT FID" in printed
    assert res["gen"] == {"skipped": "no --dit_ckpt given"}
    zs, probe, rec = res["zero-shot"], res["probe"], res["recon"]
    assert res["retrieval"]["num_images"] == 16 and "image_to_text_R@5" in res["retrieval"]
    assert zs["num_images"] == 16 and zs["num_classes"] == 8 and 0 <= zs["top1"] <= zs["top5"] <= 100
    assert probe["num_train"] == probe["num_val"] == 16 and probe["feature_dim"] == 2 * Config().encoder.width
    assert 0 <= probe["linear_top1"] <= 100 and "knn20_top1" in probe
    # A random decoder reconstructs badly; FD is labelled FD_vtp, never FID, without Inception weights.
    assert 0 < rec["psnr"] < 30 and rec["ssim"] < 0.9 and rec["rFD_vtp"] > 0 and "rFID" not in rec
    assert rec["lpips"] is None and res["fd_metric"] == "FD_vtp"
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    from PIL import Image

    assert Image.open(rec["grid_png"]).size == (8 * 32, 2 * 32)  # originals row above reconstructions


def test_cli_recon_of_a_perfect_autoencoder(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(VTP, "forward", lambda self, images: images)  # reconstruction = input
    judge = os.path.join(tiny_ckpt, "ckpt_3.pt")  # a fixed FD_vtp judge, loaded apart from the evaluated model
    rec = ev.main(["recon", f"--ckpt={tiny_ckpt}", f"--eval.fd_ckpt={judge}", f"--eval.out={tmp_path / 'r.json'}"]
                  + SMALL)["recon"]
    assert math.isinf(rec["psnr"]) and rec["ssim"] == pytest.approx(1.0)
    assert abs(rec["rFD_vtp"]) < 1e-2 and rec["fd_space"] == f"vtp:{judge}"


def test_cli_gen_npz_against_reference(tiny_ckpt, tmp_path):
    out = str(tmp_path / "res.json")
    real = tmp_path / "real.npz"
    np.savez(real, arr_0=_real_images(16))  # the very images the reference statistics are computed from
    args = ["gen", f"--ckpt={tiny_ckpt}", f"--eval.out={out}"] + SMALL
    same = ev.main(args + [f"--gen_npz={real}"])["gen"]
    assert same["num_samples"] == 16 and abs(same["gFD_vtp"]) < 1e-2 and "gFID" not in same
    noise = tmp_path / "noise.npz"
    np.savez(noise, images=np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    other = ev.main(args + [f"--gen_npz={noise}"])["gen"]
    assert other["gFD_vtp"] > 1.0 and other["reference_stats"] == same["reference_stats"]
    assert [p.name for p in tmp_path.glob("ref_*.npz")] == [os.path.basename(same["reference_stats"])]  # cached


def test_cli_all_with_inception_weights(tiny_ckpt, tmp_path, inception_file, monkeypatch):
    # sqrtm of a 2048x2048 matrix takes about a minute on 2 busy cores: record the statistics instead.
    seen = []
    monkeypatch.setattr(ev, "frechet_distance", lambda *stats: seen.append(stats) or 1.0)
    npz = tmp_path / "gen.npz"
    np.savez(npz, arr_0=_real_images(3)[::-1])  # the reference images, in another order
    res = ev.main(["all", f"--ckpt={tiny_ckpt}", f"--gen_npz={npz}", f"--eval.inception_path={inception_file}",
                   f"--eval.out={tmp_path / 'r.json'}", "--eval.num_images=3"] + SMALL[1:])
    assert res["fd_metric"] == "FID"
    assert res["recon"]["rFID"] == 1.0 and "rFD_vtp" not in res["recon"]
    assert res["gen"]["gFID"] == 1.0 and res["gen"]["fd_space"] == "inception-2015-12-05"
    assert 1.0 <= res["gen"]["inception_score"] <= 1008
    inception = [stats for stats in seen if stats[0].shape == (2048,)]  # the others are the judge's (128-d)
    assert len(inception) == 2 and all(sigma.shape == (2048, 2048) for _, sigma, *_ in inception)
    assert len(seen) == 4 and res["recon"]["rFD_judge"] == res["gen"]["gFD_judge"] == 1.0
    mu_gen, sigma_gen, mu_ref, sigma_ref = inception[1]
    np.testing.assert_allclose(mu_gen, mu_ref, rtol=1e-4, atol=1e-6)  # same images -> same Inception statistics


def test_cli_gen_samples_a_dit_checkpoint(tiny_ckpt, tmp_path):
    import train_dit

    dit_dir = str(tmp_path / "dit")
    train_dit.main([f"--tokenizer={tiny_ckpt}", f"--dit.out_dir={dit_dir}", "--dit.max_steps=1", "--dit.batch_size=8",
                    "--dit.num_cache_images=8", "--dit.stats_images=8", "--sample.num_steps=2",
                    "--dit.grid_classes=1", "--dit.grid_per_class=2"])
    gen = ev.main(["gen", f"--dit_ckpt={dit_dir}", "--eval.num_gen=4", "--eval.gen_steps=2",
                   f"--eval.out={tmp_path / 'r.json'}", "--eval.num_images=8"] + SMALL[1:])["gen"]
    # No --ckpt: FD_vtp is measured with the tokenizer the DiT was trained on.
    assert gen["num_samples"] == 4 and gen["gFD_vtp"] > 0 and gen["fd_space"] == f"vtp:{tiny_ckpt}"
    assert gen["source"].startswith(dit_dir) and os.path.isfile(gen["grid_png"])


def test_probe_feature_kinds(tiny_ckpt):
    from model import load_vtp

    model, cfg, _ = load_vtp(tiny_ckpt)
    x = torch.randn(2, 3, 32, 32)
    assert ev.probe_features(model, x, "latent").shape == (2, cfg.encoder.latent_dim)
    f = ev.probe_features(model, x, "cls_patch", n_blocks=1)
    assert f.shape == (2, 2 * cfg.encoder.width)
    feats = model.features(x)
    assert torch.allclose(f, torch.cat([feats["cls"], feats["patches"].mean(1)], dim=1), atol=1e-5)
    assert torch.allclose(ev.probe_features(model, x, "cls"), feats["cls"], atol=1e-5)  # DINO's k-NN features


def test_merge_keeps_checkpoint_data_and_applies_flags():
    base = Config()
    base.data.seed, base.data.builtin_val_size = 7, 50
    cli = ev.parse_config(["--eval.num_images=5", "--data.builtin_val_size=20", "--encoder.depth=2"])
    E = ev.Evaluator(cli, ev._explicit_overrides(["--eval.num_images=5", "--data.builtin_val_size=20",
                                                  "--encoder.depth=2"]))
    cfg = E.merge(base)
    assert cfg.data.seed == 7 and cfg.data.builtin_val_size == 20 and cfg.eval.num_images == 5
    assert cfg.encoder.depth == base.encoder.depth  # architecture flags never override the checkpoint


def test_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match="usage"):
        ev.main([])
    with pytest.raises(ConfigError, match="eval.probe_features"):
        ev.main(["probe", "--ckpt=x", "--eval.probe_features=pixels"])
    with pytest.raises(ConfigError, match="--ckpt"):
        ev.main(["zero-shot", f"--eval.out={tmp_path / 'r.json'}"])
    with pytest.raises(FileNotFoundError, match="DiT checkpoint"):
        ev.main(["gen", f"--dit_ckpt={tmp_path / 'nothing'}", f"--eval.out={tmp_path / 'r.json'}"])


def test_retrieval_recall_hand_worked():
    """3 images, 4 captions (image 0 has two); the last caption is nearer image 2 than its own image 1."""
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1.0], [0.6, 0, 0.8]])
    r = ev.retrieval_recall(images, texts, torch.tensor([0, 0, 2, 1]), ks=(1, 5))
    assert r["text_to_image_R@1"] == 75.0  # captions 0, 1, 2 find their image first; caption 3 finds image 2
    assert r["image_to_text_R@1"] == pytest.approx(200 / 3)  # image 1's best caption (0.6) is image 0's
    assert r["text_to_image_R@5"] == r["image_to_text_R@5"] == 100.0  # K beyond the candidates: everything


def test_cli_retrieval_groups_captions_of_one_image(tiny_ckpt, tmp_path):
    """A JSONL caption set with two captions per image: text->image recall is over the 6 distinct images (not 12),
    so R@10 ranks every image and is 100% even for an untrained model."""
    from PIL import Image

    images = _real_images(6)
    lines = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        lines += [json.dumps({"image": f"{i}.png", "caption": f"picture number {i}"}),
                  json.dumps({"image": f"{i}.png", "caption": f"another caption of {i}"})]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    flags = [f"--ckpt={tiny_ckpt}", f"--eval.out={tmp_path / 'r.json'}", "--data.dataset=jsonl",
             f"--data.val_path={tmp_path / 'val.jsonl'}", "--eval.batch_size=5"]
    res = ev.main(["retrieval"] + flags)["retrieval"]
    assert res["num_images"] == 6 and res["num_captions"] == 12
    assert all(0 <= res[f"{d}_R@{k}"] <= 100 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    assert res["text_to_image_R@10"] == 100.0  # 6 images: R@10 sees all of them
    # 12 captions: an image misses at R@10 only if both its captions rank 11th and 12th, which one image at most can
    assert res["image_to_text_R@10"] >= 100 * 5 / 6 - 1e-4


def test_cli_retrieval_on_builtin_captions(tiny_ckpt, tmp_path):
    res = ev.main(["retrieval", f"--ckpt={tiny_ckpt}", f"--eval.out={tmp_path / 'r.json'}"] + SMALL)["retrieval"]
    assert res["num_images"] == res["num_captions"] == 16  # one caption per built-in scene
    assert res["text_to_image_R@1"] <= res["text_to_image_R@5"] <= res["text_to_image_R@10"]


def test_retrieval_identical_features_and_a_known_permutation():
    f = torch.nn.functional.normalize(torch.randn(10, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    r = ev.retrieval_recall(f, f, torch.arange(10))
    assert all(v == 100.0 for v in r.values())  # identical image and text features: R@1 = 100% both ways
    # captions 0..4 describe images 1,0,3,2,4 but carry the features of images 0..4: only caption 4 is right at R@1
    r = ev.retrieval_recall(f[:5], f[:5], torch.tensor([1, 0, 3, 2, 4]), ks=(1,))
    assert r["text_to_image_R@1"] == pytest.approx(20.0) and r["image_to_text_R@1"] == pytest.approx(20.0)


# -----------------------------------------------------------------------------
# The judge of the built-in data


@pytest.fixture(scope="module")
def judge_data():
    x, y = ev.labelled_images(Config(), "train", 32, 400)
    return x, y


def test_judge_training_is_deterministic(judge_data):
    x, y = judge_data
    torch.manual_seed(123)
    before = torch.rand(3)  # the global RNG must come out of the training untouched
    a = ev.train_judge(x, y, 8, epochs=2, seed=0)
    b = ev.train_judge(x, y, 8, epochs=2, seed=0)
    c = ev.train_judge(x, y, 8, epochs=2, seed=1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed: bit-identical weights
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # another seed: other weights
    feats, logits = ev.judge_outputs(a, x[:10])
    assert feats.shape == (10, 128) and logits.shape == (10, 8)


def test_judge_learns_shapes():
    x, y = ev.labelled_images(Config(), "train", 32, 1500)  # 70% on these 200 val scenes (3000 scenes: 91.5%)
    judge = ev.train_judge(x, y, 8, epochs=3, seed=0)
    xv, yv = ev.labelled_images(Config(), "val", 32, 200)
    assert (ev.judge_outputs(judge, xv)[1].argmax(1) == yv).float().mean() > 0.4  # chance 0.125


def test_fd_judge_zero_on_itself_and_grows_when_classes_shift(judge_data):
    x, y = judge_data
    judge = ev.train_judge(x, y, 8, epochs=4, seed=0)
    feats = ev.judge_outputs(judge, x)[0]
    stats = ev.feature_statistics(feats)
    assert abs(ev.frechet_distance(*stats, *stats)) < 1e-3  # dead ReLU units: singular covariances, the eps retry
    half = feats[y < 4]  # the same number of images, but only the first four classes
    shifted = half[torch.arange(len(feats)) % len(half)]
    other = feats[torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))]  # same set, reordered
    assert abs(ev.frechet_distance(*ev.feature_statistics(other), *stats)) < 1e-3
    assert ev.frechet_distance(*ev.feature_statistics(shifted), *stats) > 0.05


def _judge_config(folder):
    cfg = Config()
    cfg.eval.judge_dir, cfg.eval.judge_images, cfg.eval.judge_epochs = str(folder), 64, 1
    return cfg


def test_load_judge_trains_once_and_reuses(tmp_path, capsys):
    cfg = _judge_config(tmp_path)
    a, info = ev.load_judge(cfg, 32)
    assert os.path.isfile(info["path"]) and 0 <= info["val_accuracy"] <= 1 and "training the judge" in capsys.readouterr().out
    b, info2 = ev.load_judge(cfg, 32)
    assert "training the judge" not in capsys.readouterr().out and info2 == info
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    moved = tmp_path / "moved"  # a judge copied to another folder reports the file it was loaded from
    moved.mkdir()
    shutil.copy(info["path"], moved)
    _, info3 = ev.load_judge(_judge_config(moved), 32)
    assert info3["path"] == str(moved / os.path.basename(info["path"])) and info3["val_accuracy"] == info["val_accuracy"]
    cfg.data.dataset = "folder"
    with pytest.raises(ConfigError, match="built-in"):
        ev.load_judge(cfg, 32)


def test_cli_gen_judge_accuracy_and_fd(tiny_ckpt, tmp_path):
    real = _real_images(16)
    labels = np.asarray(ev.labelled_images(Config(), "train", 32, 16)[1])
    args = ["gen", f"--ckpt={tiny_ckpt}", f"--eval.out={tmp_path / 'res.json'}"] + SMALL
    right, wrong = tmp_path / "right.npz", tmp_path / "wrong.npz"
    np.savez(right, arr_0=real, labels=labels)
    np.savez(wrong, arr_0=real, labels=(labels + 1) % 8)
    a = ev.main(args + [f"--gen_npz={right}"])["gen"]
    b = ev.main(args + [f"--gen_npz={wrong}"])["gen"]
    assert abs(a["gFD_judge"]) < 1e-3 and b["gFD_judge"] == a["gFD_judge"]  # the reference images themselves
    judge, _ = ev.load_judge(_judge_config(JUDGE_DIR), 32)  # the judge the CLI saved
    x = ev.normalize(torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255)
    pred = ev.judge_outputs(judge, x)[1].argmax(1).numpy()
    assert a["judge_accuracy"] == pytest.approx((pred == labels).mean())
    assert b["judge_accuracy"] == pytest.approx((pred == (labels + 1) % 8).mean())
