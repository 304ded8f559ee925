"""Tests of pretrain.py: schedules, stage-1/2 smoke runs, resume equivalence, DDP parity, ablations, errors."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import losses
import pretrain
from model import Config, ConfigError, NonFiniteLoss, Tracker, load_vtp, resolve_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a very small stage-1 run: depth-1 towers, a few images per step
SMALL = ["--encoder.depth=1", "--decoder.depth=1", "--text.depth=1", "--encoder.width=64", "--decoder.width=64",
         "--encoder.num_heads=2", "--decoder.num_heads=2", "--text.width=64", "--text.embed_dim=64",
         "--text.vocab_size=300", "--text.context_length=24", "--head.hidden_dim=64", "--head.bottleneck_dim=32",
         "--head.num_prototypes=64", "--data.batch_size=8", "--data.ssl_batch_size=4", "--data.rec_batch_size=4",
         "--data.num_local_crops=2", "--train.log_every=1", "--train.preview_every=2"]


def run(tmp, *extra):
    return pretrain.main(SMALL + [f"--train.out_dir={tmp}", *extra])


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- schedules ---

def test_schedules_are_pure_functions_of_the_step():
    cfg = Config()
    cfg.train.max_steps, cfg.optim.warmup_frac, cfg.optim.min_lr_frac = 100, 0.1, 0.01
    cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp = 0.04, 0.07  # DINOv2's warm-up of S/B/L (tiny: 0.02 flat)
    peak = 1e-3
    assert pretrain.lr_at(0, cfg, peak) == pytest.approx(peak / 10)
    assert pretrain.lr_at(9, cfg, peak) == pytest.approx(peak)
    assert pretrain.lr_at(55, cfg, peak) == pytest.approx(0.01 * peak + 0.99 * peak * 0.5)  # half-way down
    assert pretrain.lr_at(100, cfg, peak) == pytest.approx(0.01 * peak)
    lrs = [pretrain.lr_at(s, cfg, peak) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert pretrain.teacher_momentum_at(0, cfg) == pytest.approx(0.992)
    assert pretrain.teacher_momentum_at(50, cfg) == pytest.approx(0.996)
    assert pretrain.teacher_momentum_at(100, cfg) == pytest.approx(1.0)
    assert pretrain.teacher_temp_at(0, cfg) == pytest.approx(0.04)
    assert pretrain.teacher_temp_at(15, cfg) == pytest.approx(0.055)
    assert pretrain.teacher_temp_at(30, cfg) == pytest.approx(0.07) == pretrain.teacher_temp_at(99, cfg)
    cfg.data.batch_size, cfg.optim.lr, cfg.optim.lr_ref_batch = 64, 5e-4, 4096
    assert pretrain.peak_lr(cfg, world_size=4) == pytest.approx(5e-4 * math.sqrt(256 / 4096))


def test_tracker_means_and_first_bad_step():
    tr = Tracker()
    for step, (a, g) in enumerate([(1.0, 10.0), (3.0, 20.0)], start=1):
        tr.add({"clip": torch.tensor(a), "total": torch.tensor(2 * a)}, step)  # two micro-steps per step
        tr.add({"clip": torch.tensor(a), "total": torch.tensor(2 * a)}, step)
        tr.add({"grad_norm": torch.tensor(g)}, step)  # once per step
    assert tr.flush() == {"clip": 2.0, "total": 4.0, "grad_norm": 15.0}
    tr.add({"clip": torch.tensor(5.0)}, 3)
    tr.add({"clip": torch.tensor(float("inf"))}, 4)
    tr.add({"clip": torch.tensor(float("nan"))}, 5)
    with pytest.raises(NonFiniteLoss, match="'clip' became nan at step 4"):
        tr.flush()


def test_param_groups_exclude_norms_biases_tokens_logit_scale():
    cfg = pretrain.parse_config(SMALL)
    student = pretrain.Student(cfg)
    groups = pretrain.param_groups(student, 0.05, text_lr_mult=0.1)
    names = {id(p): n for n, p in student.named_parameters()}
    where = {names[id(p)]: (g["weight_decay"], g["lr_mult"]) for g in groups for p in g["params"]}
    assert sorted(where) == sorted(n for n, p in student.named_parameters() if p.requires_grad)  # each param once
    for n in ("vtp.trunk.cls_token", "vtp.trunk.mask_token", "vtp.logit_scale", "vtp.trunk.norm.weight",
              "vtp.trunk.blocks.0.attn.qkv.bias"):
        assert where[n] == (0.0, 1.0), n
    for n in ("vtp.trunk.blocks.0.attn.qkv.weight", "vtp.trunk.feature_bottleneck.weight", "dino_head.last_layer.weight",
              "vtp.visual_proj.weight"):
        assert where[n] == (0.05, 1.0), n
    for n in ("vtp.token_embedding.weight", "vtp.positional_embedding", "vtp.text_projection",
              "vtp.text_transformer.resblocks.0.attn.in_proj_weight"):
        assert where[n] == (0.05, 0.1), n
    assert where["vtp.ln_final.weight"] == where["vtp.text_transformer.resblocks.0.ln_1.bias"] == (0.0, 0.1)


def test_text_lr_mult_scales_only_the_text_tower(tmp_path):
    """At text_lr_mult=0 a step leaves every text-tower weight as it was and still moves the image tower."""
    for steps in (1, 2):
        run(tmp_path / str(steps), f"--train.max_steps={steps}", "--optim.text_lr_mult=0")
    a, b = (torch.load(resolve_checkpoint(str(tmp_path / s)), map_location="cpu", weights_only=True)["model"]
            for s in ("1", "2"))
    text = [n for n in a if any(part in pretrain.TEXT_TOWER for part in n.split("."))]
    assert len(text) > 5 and all(torch.equal(a[n], b[n]) for n in text)
    assert not torch.equal(a["trunk.blocks.0.attn.qkv.weight"], b["trunk.blocks.0.attn.qkv.weight"])


# --- stage 1 and stage 2 smoke runs ---

def test_stage1_and_stage2_smoke(tmp_path):
    out = tmp_path / "run"
    run(out, "--train.max_steps=3", "--train.ckpt_every=2")
    assert sorted(os.listdir(out / "previews"))[-1] == "recon_0000003.png"
    assert (out / "ckpt_0000002.pt").exists() and (out / "ckpt_0000003.pt").exists()
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("total", "clip", "dino", "ibot", "koleo", "ssl", "rec", "l1", "lr", "grad_norm", "img_per_s",
                "ent_t_dino", "ent_s_dino", "ent_t_ibot", "ent_s_ibot"):
        assert math.isfinite(rows[-1][key]), key
    log_k = rows[-1]["log_k"]
    assert log_k == pytest.approx(math.log(64))  # SMALL has 64 prototypes
    assert all(0 <= rows[-1][k] <= log_k + 1e-4 for k in ("ent_t_dino", "ent_s_dino", "ent_t_ibot", "ent_s_ibot"))
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["batch_size"] == 8
    stage1, cfg, ckpt = load_vtp(str(out))
    assert ckpt["step"] == 3 and ckpt["stage"] == 1 and ckpt["tokenizer"] is not None

    run(out, "--train.stage=2", "--train.max_steps=2", "--loss.gan_start=1")
    rows2 = metrics(out / "stage2")
    assert rows2[0]["gan"] == 0.0 and rows2[1]["gan"] != 0.0, "the GAN term starts at loss.gan_start"
    assert "disc" in rows2[1] and rows2[1]["adaptive_weight"] > 0
    final, _, ckpt2 = load_vtp(str(out / "stage2"))
    assert ckpt2["stage"] == 2
    sd1, sd2 = stage1.state_dict(), final.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1 if not k.startswith("pixel_decoder.")), "encoder frozen"
    assert any(not torch.equal(sd1[k], sd2[k]) for k in sd1 if k.startswith("pixel_decoder.")), "decoder trained"


def test_stage2_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 2 needs a stage-1 checkpoint"):
        run(tmp_path / "empty", "--train.stage=2", "--train.max_steps=1")


def test_bad_config_fails_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="data.rec_batch_size"):
        run(tmp_path, "--data.rec_batch_size=100")
    with pytest.raises(ConfigError, match="run.amp"):
        run(tmp_path, "--run.amp=int8")
    assert not (tmp_path / "metrics.jsonl").exists()


# the parameters that each objective alone trains (the shared trunk trains under every setting)
OBJECTIVE_PARAMS = {
    "clip": ("vtp.token_embedding.", "vtp.positional_embedding", "vtp.text_transformer.", "vtp.ln_final.",
             "vtp.text_projection", "vtp.visual_proj.", "vtp.logit_scale"),
    "ssl": ("dino_head.", "vtp.trunk.mask_token"),
    "rec": ("vtp.pixel_decoder.", "vtp.trunk.feature_bottleneck."),
}


@pytest.mark.parametrize("lams", [("0.1", "0", "0"), ("0.1", "0", "1"), ("0.1", "1", "0"), ("0", "1", "1")],
                         ids=["ae_only", "clip_ae", "ssl_ae", "no_rec"])
def test_ablations_run(tmp_path, lams, monkeypatch):
    """A λ of 0 leaves the parameters only its objective uses bit-identical to their initial values (Method §1),
    while the parameters of the objectives that are on all move."""
    initial = {}

    class RecordingStudent(pretrain.Student):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            initial.update({n: p.detach().clone() for n, p in self.named_parameters()})

    monkeypatch.setattr(pretrain, "Student", RecordingStudent)
    rec, ssl, clip = lams
    student = run(tmp_path, "--train.max_steps=2", "--head.freeze_last_layer_steps=0", f"--loss.lambda_rec={rec}",
                  f"--loss.lambda_ssl={ssl}", f"--loss.lambda_clip={clip}")
    row = metrics(tmp_path)[-1]
    assert ("clip" in row) == (clip != "0") and ("dino" in row) == (ssl != "0") and ("rec" in row) == (rec != "0")
    assert math.isfinite(row["total"])
    final = dict(student.named_parameters())
    assert initial.keys() == final.keys()
    on = {"clip": clip != "0", "ssl": ssl != "0", "rec": rec != "0"}
    for objective, prefixes in OBJECTIVE_PARAMS.items():
        names = [n for n in final if n.startswith(prefixes)]
        assert names, objective
        for n in names:
            unchanged = torch.equal(final[n], initial[n])
            assert unchanged != on[objective], f"{n} {'did not train' if on[objective] else 'changed'}"
    trunk = [n for n in final if n.startswith("vtp.trunk.blocks.")]
    assert trunk and all(not torch.equal(final[n], initial[n]) for n in trunk)


def test_non_finite_loss_stops_without_overwriting_checkpoint(tmp_path, monkeypatch):
    real = losses.clip_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(losses, "clip_loss", flaky)
    with pytest.raises(NonFiniteLoss, match="'clip' became nan at step 3"):
        run(tmp_path, "--train.max_steps=4", "--train.ckpt_every=1")
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000001.pt", "ckpt_0000002.pt"]


def test_last_layer_frozen_for_the_first_steps(tmp_path):
    run(tmp_path, "--train.max_steps=3", "--train.ckpt_every=1", "--head.freeze_last_layer_steps=2")
    ckpts = [torch.load(tmp_path / f"ckpt_{s:07d}.pt", weights_only=True) for s in (1, 2, 3)]
    protos = [c["dino_head"]["last_layer.weight"] for c in ckpts]
    teacher = [c["teacher"]["dino_head.last_layer.weight"] for c in ckpts]
    mlp = [c["dino_head"]["mlp.0.weight"] for c in ckpts]
    assert not torch.equal(mlp[0], mlp[1]), "the rest of the head trains during the freeze"
    assert torch.equal(protos[0], protos[1]), "prototypes frozen (steps 1-2)"
    # the teacher's are the EMA of unchanged ones: m·w + (1 - m)·w, equal up to rounding
    assert all(torch.allclose(t, protos[0], rtol=1e-6, atol=0) for t in teacher[:2])
    assert not torch.equal(protos[1], protos[2]), "prototypes train after the freeze (step 3)"
    # a run without the freeze moves them at step 1 already: what the assertions above would catch
    run(tmp_path / "free", "--train.max_steps=1", "--head.freeze_last_layer_steps=0")
    free = torch.load(tmp_path / "free" / "ckpt_0000001.pt", weights_only=True)["dino_head"]["last_layer.weight"]
    assert not torch.equal(free, protos[0])


# --- resume ---

def test_resume_gives_identical_losses_and_parameters(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # with stochastic depth in every forward: its draws must come from (seed, rank, step) alone
    drop = ["--encoder.drop_path_clip=0.2", "--encoder.drop_path_ssl=0.2", "--encoder.drop_path_rec=0.2"]
    run(straight, "--train.max_steps=4", "--train.ckpt_every=2", *drop)
    # a run killed after its step-2 checkpoint leaves exactly that file behind
    resumed.mkdir()
    shutil.copy(straight / "ckpt_0000002.pt", resumed / "ckpt_0000002.pt")
    # ... and its metrics up to the kill: a row logged after the checkpoint must not survive the resume
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(straight)[:3]))
    run(resumed, "--train.max_steps=4", "--train.ckpt_every=2", "--train.resume", *drop)
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]
    a, b = metrics(straight)[2:], metrics(resumed)[2:]
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a, b):
        for key in ("total", "clip", "dino", "ibot", "koleo", "rec", "grad_norm"):
            assert ra[key] == rb[key], key
    sa = torch.load(straight / "ckpt_0000004.pt", weights_only=True)
    sb = torch.load(resumed / "ckpt_0000004.pt", weights_only=True)
    for part in ("model", "dino_head", "teacher"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k}"
    # the tiny default centres the teacher (DINO): its running centres are state the resume must carry
    assert sa["teacher"]["center_cls.center"].abs().sum() > 0 and sa["teacher"]["center_patch.center"].abs().sum() > 0
    assert sa["data"] == sb["data"]
    # resuming a finished run is a no-op that exits cleanly
    run(resumed, "--train.max_steps=4", "--train.ckpt_every=2", "--train.resume")
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    # CLIP + AE through the training loop: 2 micro-steps of 4 pairs (the loader's next 8 samples) give the update of
    # one step on those 8 (CLIP by cached gradients over both; tests/test_accumulation.py checks every objective).
    common = SMALL + ["--loss.lambda_ssl=0", "--train.max_steps=2", "--train.ckpt_every=1",
                      "--optim.eps=1.0", "--optim.lr=0.1", "--optim.lr_ref_batch=8"]
    run(tmp_path / "accum", *common, "--data.batch_size=4", "--data.rec_batch_size=4", "--data.ssl_batch_size=4",
        "--train.accum_steps=2")
    run(tmp_path / "big", *common, "--data.batch_size=8", "--data.rec_batch_size=8", "--data.ssl_batch_size=4")
    a = torch.load(tmp_path / "accum" / "ckpt_0000002.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "big" / "ckpt_0000002.pt", weights_only=True)["model"]
    a1 = torch.load(tmp_path / "accum" / "ckpt_0000001.pt", weights_only=True)["model"]
    assert not torch.equal(a1["pixel_decoder.proj_out.weight"], a["pixel_decoder.proj_out.weight"]), "it trained"
    assert not torch.equal(a1["text_projection"], a["text_projection"]), "CLIP trained"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    ma, mb = metrics(tmp_path / "accum"), metrics(tmp_path / "big")
    for ra, rb in zip(ma, mb):  # the logged losses are the big batch's too
        assert ra["clip"] == pytest.approx(rb["clip"], rel=1e-5) and ra["total"] == pytest.approx(rb["total"], rel=1e-5)


# --- DDP ---

def torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "pretrain.py")] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_two_process_gloo_matches_single_process(tmp_path):
    # CLIP + reconstruction: the gathered CLIP loss and the mean reconstruction loss over 2x4 images equal the
    # single-process loss over 8 images (SSL is checked to run in DDP below: KoLeo neighbours and the iBOT mask
    # ratios are per-process by design, so SSL is not bit-comparable across process counts).
    # Adam divides by sqrt(v): a gradient that is zero up to rounding (e.g. the attention key bias) would move by
    # +-lr in either run. eps=1 makes such updates negligible, so parameters can be compared tightly.
    common = SMALL + ["--loss.lambda_ssl=0", "--train.max_steps=3", "--train.ckpt_every=3", "--optim.grad_clip=0",
                      "--optim.eps=1.0", "--optim.lr=0.1"]
    per_proc = ["--data.batch_size=4", "--data.rec_batch_size=4", "--data.ssl_batch_size=4"]
    ddp = torchrun(common + per_proc + [f"--train.out_dir={tmp_path / 'ddp'}"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "identical on 2 processes" in ddp.stdout + ddp.stderr
    pretrain.main(common + ["--data.batch_size=8", "--data.rec_batch_size=8", "--data.ssl_batch_size=4",
                            f"--train.out_dir={tmp_path / 'single'}"])
    a = torch.load(tmp_path / "ddp" / "ckpt_0000003.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "single" / "ckpt_0000003.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    ma, mb = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    for ra, rb in zip(ma, mb):
        assert ra["clip"] == pytest.approx(rb["clip"], rel=1e-4)
        assert ra["rec"] == pytest.approx(rb["rec"], rel=1e-4)


def test_two_process_full_vtp_runs_in_sync(tmp_path):
    res = torchrun(SMALL + ["--train.max_steps=2", f"--train.out_dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "identical on 2 processes" in res.stdout + res.stderr
    assert (tmp_path / "ckpt_0000002.pt").exists()


def test_two_process_runs_print_no_grad_stride_warning(tmp_path):
    """DDP warns "Grad strides do not match bucket view strides" (and copies the gradient every step) when a weight
    gradient comes back in another memory layout than its parameter: the pixel decoder's 1x1 output conv did, on
    CPU from 16 images per process on (stage 1 with B_rec = 16, stage 2)."""
    common = SMALL + ["--train.max_steps=2", "--data.batch_size=16", f"--train.out_dir={tmp_path}"]
    for stage in (["--data.rec_batch_size=16"], ["--train.stage=2"]):
        res = torchrun(common + stage)
        assert res.returncode == 0 and "terminate called" not in res.stderr, res.stderr[-3000:]
        assert "grad strides" not in res.stderr.lower(), res.stderr[-3000:]


def test_stage2_trains_with_its_grad_scaler_and_checkpoints_it(tmp_path, monkeypatch):
    """fp16 (CUDA) gives stage 2 a GradScaler: both backward passes are scaled, and its state is saved and resumed.
    Checked on a CPU with a CPU GradScaler in place of amp_setup's CUDA one."""
    run(tmp_path, "--train.max_steps=1")
    real = pretrain.amp_setup
    monkeypatch.setattr(pretrain, "amp_setup", lambda amp, device: (real("fp32", device)[0],
                                                                    torch.amp.GradScaler("cpu", init_scale=256.0)))
    run(tmp_path, "--train.stage=2", "--train.max_steps=2", "--train.ckpt_every=1", "--loss.gan_start=1")
    ckpt = torch.load(tmp_path / "stage2" / "ckpt_0000002.pt", weights_only=True)
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] == 256.0  # finite gradients: no back-off
    assert all(math.isfinite(r["total"]) for r in metrics(tmp_path / "stage2"))
    run(tmp_path, "--train.stage=2", "--train.max_steps=3", "--train.resume", "--loss.gan_start=1")
    resumed = torch.load(tmp_path / "stage2" / "ckpt_0000003.pt", weights_only=True)
    assert resumed["scaler"]["_growth_tracker"] == ckpt["scaler"]["_growth_tracker"] + 1  # continued, not reset
