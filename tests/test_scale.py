"""The S/B/L path at scale, rehearsed on a CPU: activation checkpointing, regional compilation, the paper's recipe
files at start-up, rank-0 resume without a shared disk, checkpoint pruning, fp32 prototype logits, and a 2-process
gloo run of the real S architecture on tar shards that is stopped and resumed."""

import gzip
import os
import subprocess
import sys

import pytest
import torch

import data
import pretrain
from model import (PRESETS, Config, ConfigError, DINOHead, HeadConfig, export_official, load_checkpoint, parse_config,
                   save_checkpoint)
from test_pretrain import ROOT, SMALL, metrics

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import preview_data  # noqa: E402

# --- activation checkpointing ---


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for the backward while fn() runs (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_grad_checkpoint_gives_the_same_gradients_and_saves_less():
    """One stage-1 step (CLIP + SSL + reconstruction, stochastic depth on) with and without checkpointing: the same
    loss and gradients to the bit, and the recorded activations shrink to the block inputs."""
    cfg = parse_config(SMALL + ["--encoder.depth=3", "--encoder.drop_path_ssl=0.3", "--encoder.drop_path_clip=0.3"])
    batch = pretrain_batch(cfg)
    results = []
    for on in (False, True):
        cfg.train.grad_checkpoint = on
        torch.manual_seed(0)
        student = pretrain.Student(cfg)
        teacher = pretrain.Teacher(student)
        probs = teacher(batch["global_crops"], batch["mask_indices"], 0.04, batch["mask_weight"])
        gen = torch.Generator().manual_seed(5)
        (terms, _), nbytes = saved_bytes(lambda: student(batch, probs, gen))
        assert not any(k.startswith("ent_") for k in terms), "the SSL entropies run on log steps only"
        terms["total"].backward()
        results.append((terms["total"], {n: p.grad for n, p in student.named_parameters() if p.grad is not None},
                        nbytes))
    (loss_off, grads_off, bytes_off), (loss_on, grads_on, bytes_on) = results
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and all(torch.equal(grads_off[k], grads_on[k]) for k in grads_off)
    assert bytes_on < 0.6 * bytes_off


def pretrain_batch(cfg):
    loader = data.build_pretrain_loader(cfg, data.BPETokenizer(cfg.text.vocab_size, cfg.text.context_length))
    return data.batch_to_device(next(loader), torch.device("cpu"))


# --- regional compilation ---


def test_compiled_blocks_match_eager_without_graph_breaks_or_recompiles(tmp_path, monkeypatch, backend="eager"):
    """run.compile: every block compiled in place. The losses of 6 steps equal eager's to fp32 tolerance; nothing
    breaks a graph; once step 1 has shown every shape (three student passes, teacher, decoder, text tower, the
    preview) no graph is compiled again. Dynamo's graphs are the same under every backend; "eager" runs them as they
    are, the backend one forces first when debugging a compile problem (inductor's code generation takes minutes on
    2 cores: its first step and its losses are measured by scripts/benchmark.py --compile and in the experiment
    record)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    common = SMALL + ["--train.max_steps=6", "--train.preview_every=1", "--encoder.drop_path_ssl=0.2"]
    pretrain.main(common + [f"--train.out_dir={tmp_path / 'eager'}"])
    graphs = []  # compiled graphs so far, at each optimizer step
    real_step = pretrain.optimizer_step
    monkeypatch.setattr(pretrain, "optimizer_step",
                        lambda *a, **k: graphs.append(counters["stats"]["unique_graphs"]) or real_step(*a, **k))
    pretrain.main(common + [f"--train.out_dir={tmp_path / 'compiled'}", "--run.compile=true",
                            f"--run.compile_backend={backend}"])
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[1] == graphs[-1] == counters["stats"]["unique_graphs"], f"graphs compiled by step: {graphs}"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    rows_eager, rows_compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert len(rows_eager) == len(rows_compiled) == 6
    for a, b in zip(rows_eager, rows_compiled):
        for key in ("total", "clip", "dino", "ibot", "koleo", "rec"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    torch._dynamo.reset()


# --- the paper's recipe at start-up ---


def test_released_presets_need_clip_vocabulary_and_lpips_weights(tmp_path):
    """S/B/L stop at start-up, before building anything, naming the flag and its opt-out."""
    out = f"--train.out_dir={tmp_path}"
    with pytest.raises(ConfigError, match=r"text.tokenizer is empty.*--text.tokenizer=bpe"):
        pretrain.main(["--preset=S", out])
    with pytest.raises(ConfigError, match=r"loss.lpips_vgg_path.*--loss.lpips=off"):
        pretrain.main(["--preset=B", "--text.tokenizer=bpe", out])
    with pytest.raises(ConfigError, match=r"loss.lpips_lin_path"):
        (tmp_path / "vgg.pth").write_bytes(b"")
        pretrain.main(["--preset=L", "--text.tokenizer=bpe", f"--loss.lpips_vgg_path={tmp_path / 'vgg.pth'}", out])
    for name in ("S", "B", "L"):
        c = PRESETS[name]()
        assert c.train.grad_checkpoint and c.loss.lpips == "on" and c.text.tokenizer == "", name
    tiny = Config()
    assert tiny == PRESETS["tiny"](), "the dataclass defaults are the tiny preset: a fork edits one place"
    assert not tiny.train.grad_checkpoint and tiny.loss.lpips == "auto" and tiny.text.tokenizer == "bpe"


def test_prototype_logits_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head = DINOHead(32, HeadConfig(hidden_dim=64, bottleneck_dim=16, num_prototypes=128))
    x = torch.randn(10, 32)
    ref = head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.float32
    # the MLP ran in bf16, the cosines against the prototypes in fp32: far closer than bf16's 2^-8 steps
    assert (out - ref).abs().max() < 0.02 and not torch.equal(out, out.bfloat16().float())


# --- checkpoints ---


def test_keep_ckpts_prunes_old_checkpoints(tmp_path):
    pretrain.main(SMALL + [f"--train.out_dir={tmp_path}", "--train.max_steps=4", "--train.ckpt_every=1",
                           "--train.keep_ckpts=2"])
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
    ckpt = torch.load(tmp_path / "ckpt_0000004.pt", weights_only=True)
    assert ckpt["world_size"] == 1 and isinstance(ckpt["data"], list) and len(ckpt["data"]) == 1


def test_load_checkpoint_names_an_unreadable_file(tmp_path):
    save_checkpoint(str(tmp_path / "ckpt_0000001.pt"), {"step": 1, "w": torch.ones(3)})
    path, state = load_checkpoint(str(tmp_path))
    assert path.endswith("ckpt_0000001.pt") and state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    (tmp_path / "ckpt_0000002.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(RuntimeError, match="rank 0 cannot read checkpoint .*ckpt_0000002.pt"):
        load_checkpoint(str(tmp_path))
    assert load_checkpoint(str(tmp_path / "empty")) == (None, None)
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        load_checkpoint(str(tmp_path / "empty"), "train stage 1 first")


def test_export_with_another_patch_size_says_the_authors_code_cannot_load_it(tmp_path):
    from model import VTP
    cfg = Config()
    notes = export_official(VTP(cfg), cfg, str(tmp_path / "export"))
    assert any("hard-codes 16x16" in n for n in notes)
    cfg = parse_config(["--encoder.patch_size=16", "--encoder.image_size=32"])
    assert not any("hard-codes" in n for n in export_official(VTP(cfg), cfg, str(tmp_path / "export16")))


def test_resume_on_another_number_of_processes_says_how_batch_and_lr_change(capsys):
    cfg = parse_config(["--preset=S"])
    pretrain.note_new_layout({"world_size": 16}, cfg, 8, pretrain.peak_lr(cfg, 8))
    out = capsys.readouterr().out
    assert "resuming on 8 processes, saved on 16: global batch 12288 -> 6144" in out
    assert "peak lr 8.66e-04 -> 6.12e-04" in out  # 5e-4 * sqrt(B / 4096)
    pretrain.note_new_layout({"world_size": 8}, cfg, 8, pretrain.peak_lr(cfg, 8))
    assert capsys.readouterr().out == ""


# --- the GPU run rehearsed on a CPU ---


def torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "pretrain.py")] + args
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0 and "terminate called" not in res.stderr, res.stderr[-4000:]
    return res


def test_rehearsal_of_the_gpu_run_resumes_on_nodes_without_a_shared_disk(tmp_path):
    """The S preset's networks (encoder, decoder, text tower, 65536-prototype head) at 64 px under 2-process gloo on
    tar shards, through the shipped path: grad checkpointing, a shuffle buffer over several open shards, uint8
    batches, CLIP's merges-file tokenizer (a small merges file, and 16 text positions instead of 77 for the suite's
    time). Each rank writes to its own out_dir ($RANK), as two nodes without a
    shared disk would: only rank 0 holds checkpoints, and a resume reads them on rank 0 and broadcasts them.
    3 steps, stop, resume, 2 more: the same losses and weights as an uninterrupted 5-step run."""
    preview_data.write_shards(data.BuiltinScenes("train", 64, size=40), str(tmp_path / "shards"), 4, 10)
    merges = tmp_path / "merges.txt.gz"
    with gzip.open(merges, "wt") as f:
        f.write("#version: 0.2\nh o\np h\nph o\nt o</w>\n")
    common = ["--preset=S", "--encoder.image_size=64", f"--text.tokenizer={merges}", "--text.vocab_size=518",
              "--text.context_length=16", "--loss.lpips=off", "--data.dataset=tar",
              f"--data.path={tmp_path / 'shards' / '{00000..00003}.tar'}", "--data.holdout=0", "--data.num_workers=0",
              "--data.batch_size=2", "--data.ssl_batch_size=2", "--data.rec_batch_size=1", "--data.shuffle_buffer=6",
              "--data.shuffle_shards=2", "--train.max_steps=5",
              "--train.log_every=1", "--train.ckpt_every=3", "--train.preview_every=100", "--optim.lr=1e-3",
              "--optim.warmup_frac=0.4", "--head.freeze_last_layer_steps=2"]
    straight = torchrun(common + [f"--train.out_dir={tmp_path / 'straight' / 'node$RANK'}"])
    assert "identical on 2 processes" in straight.stdout + straight.stderr
    node0 = tmp_path / "straight" / "node0"
    assert not list((tmp_path / "straight" / "node1").glob("ckpt_*"))  # rank 1's disk holds no checkpoint
    # a job killed after its step-3 checkpoint: rank 0's node kept that file, rank 1's node has nothing
    resumed = tmp_path / "resumed"
    (resumed / "node0").mkdir(parents=True)
    (resumed / "node0" / "ckpt_0000003.pt").write_bytes((node0 / "ckpt_0000003.pt").read_bytes())
    torchrun(common + [f"--train.out_dir={resumed / 'node$RANK'}", "--train.resume=true"])
    a, b = metrics(node0), metrics(resumed / "node0")
    assert [r["step"] for r in b] == [4, 5]
    for ra, rb in zip(a[3:], b):
        for key in ("total", "clip", "dino", "ibot", "koleo", "rec", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    sa = torch.load(node0 / "ckpt_0000005.pt", weights_only=True, mmap=True)
    sb = torch.load(resumed / "node0" / "ckpt_0000005.pt", weights_only=True, mmap=True)
    for part in ("model", "teacher"):
        for k in sa[part]:
            assert torch.allclose(sa[part][k].float(), sb[part][k].float(), rtol=1e-5, atol=1e-6), f"{part}.{k}"
    assert sa["data"] == sb["data"] and len(sa["data"]) == 2  # both ranks' stream positions, continued exactly
