"""Real captioned data as users bring it: no validation set (a held-back slice), tar shards with bad samples through
pre-training and retrieval, and one-line errors (exit code 2, no traceback) from every entry point."""

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import data
from model import parse_config
from test_data import CORRUPT_JPEG, write_tar
from test_pretrain import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(i):
    """A built-in scene as JPEG bytes (real photo-like content for the decoder and the crops)."""
    buf = io.BytesIO()
    data.BuiltinScenes("train", 48, 1000)[i]["image"].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_jpeg_shards(folder, n=12):
    """Two img2dataset-style shards of n samples; shard 0 also has a corrupt JPEG, shard 1 an image without caption."""
    for s in range(2):
        samples = [(f"{s:05d}{k:04d}", {"jpg": jpeg(s * n + k), "txt": f"scene {s * n + k}".encode(), "json": b"{}"})
                   for k in range(n)]
        samples.insert(3, (f"{s:05d}bad", {"jpg": CORRUPT_JPEG, "txt": b"broken"} if s == 0 else {"jpg": jpeg(99)}))
        write_tar(folder / f"{s:05d}.tar", samples)
    return str(folder / "{00000..00001}.tar")


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_map_style_reader_holds_back_a_disjoint_slice(tmp_path):
    lines = [json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) for i in range(30)]
    for i in range(30):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    cfg = parse_config(["--data.dataset=jsonl", f"--data.path={tmp_path / 'd.jsonl'}", "--data.holdout=5"])
    train, val = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "val")
    assert len(train) == 27 and len(val) == 3  # at most a tenth is held back
    assert {x[1] for x in train.items}.isdisjoint(x[1] for x in val.items)
    assert [val[i]["caption"] for i in range(3)] == ["c9", "c19", "c29"]  # evenly spaced over the data
    assert len(data.build_dataset(cfg, "all")) == 30  # the DiT's latent cache uses every sample


def test_held_back_images_take_all_their_captions_and_every_class(tmp_path):
    lines = [json.dumps({"image": f"{i // 2}.png", "caption": f"c{i}"}) for i in range(40)]  # 2 captions per image
    for i in range(20):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    cfg = parse_config(["--data.dataset=jsonl", f"--data.path={tmp_path / 'd.jsonl'}", "--data.holdout=2"])
    val = data.build_dataset(cfg, "val")
    assert [x[1] for x in val.items] == ["c18", "c19", "c38", "c39"]  # images 9 and 19, both captions each
    for c in range(4):  # a class folder: the held-back images come from every class, not the last ones
        for i in range(10):
            os.makedirs(tmp_path / "cls" / f"k{c}", exist_ok=True)
            Image.new("RGB", (8, 8), (c, i, 0)).save(tmp_path / "cls" / f"k{c}" / f"{i}.png")
    cfg = parse_config(["--data.dataset=imagenet", f"--data.path={tmp_path / 'cls'}", "--data.holdout=4"])
    val = data.build_dataset(cfg, "val")
    assert sorted(val[i]["label"] for i in range(len(val))) == [0, 1, 2, 3]


def test_tar_holds_back_the_first_samples_of_the_first_shard(tmp_path):
    pattern = make_jpeg_shards(tmp_path, n=6)
    cfg = parse_config(["--data.dataset=tar", f"--data.path={pattern}", "--data.holdout=4"])
    train, val = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "val")
    val_caps = [s["caption"] for s in val]
    assert val_caps == ["scene 0", "scene 1", "scene 2"]  # the 4th key group of shard 0 is the corrupt sample
    train_caps = [s["caption"] for s in train]
    assert set(train_caps).isdisjoint(val_caps) and len(train_caps) == 3 + 6  # shard 0 after the slice, shard 1
    groups = train.reader_groups(0, seed=0, per_group=2)
    streamed = [s["caption"] for _, _, _, s in train.stream(0, groups, seed=0, buffer_size=4) if s is not None]
    assert sorted(streamed) == sorted(train_caps)  # the training stream never sees the held-back samples
    assert streamed != train_caps  # (shuffled across both shards)


def test_the_held_back_slice_is_announced_once(tmp_path, capsys):
    """build_tokenizer and build_pretrain_loader both build the training view: one log line per process."""
    pattern = make_jpeg_shards(tmp_path, n=6)
    cfg = parse_config(["--data.dataset=tar", f"--data.path={pattern}", "--data.holdout=4", "--data.batch_size=2",
                        "--data.ssl_batch_size=1", "--data.rec_batch_size=1", "--text.vocab_size=300",
                        "--loss.koleo_weight=0"])
    data.build_pretrain_loader(cfg, data.build_tokenizer(cfg))
    data.build_dataset(cfg, "train")
    assert capsys.readouterr().err.count("held back for validation") == 1


def test_pretrain_and_retrieval_on_tar_shards_without_val_path(tmp_path):
    pattern = make_jpeg_shards(tmp_path)
    flags = ["--data.dataset=tar", f"--data.path={pattern}", "--data.holdout=4", "--encoder.image_size=32"]
    out = tmp_path / "run"
    r = run("pretrain.py", *SMALL, *flags, f"--train.out_dir={out}", "--train.max_steps=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held back for validation" in r.stderr
    assert "skipped" in r.stderr and ("corrupt" in r.stderr or "unreadable image" in r.stderr)
    assert os.path.isfile(out / "ckpt_0000003.pt") and os.listdir(out / "previews")
    res = tmp_path / "r.json"
    r = run("evaluate.py", "retrieval", f"--ckpt={out}", f"--eval.out={res}", "--eval.batch_size=4")
    assert r.returncode == 0, r.stderr[-2000:]
    ret = json.loads(res.read_text())["retrieval"]
    assert ret["num_images"] == ret["num_captions"] == 3  # the held-back slice: 4 key groups, one corrupt
    assert "skipped" in r.stderr  # the corrupt sample is counted here too


@pytest.mark.parametrize("script,args,flag", [
    ("pretrain.py", ["--data.dataset=tar", "--data.path=/nonexistent/{00000..00001}.tar"], "data.path"),
    ("pretrain.py", ["--data.dataset=folder"], "data.path"),
    ("pretrain.py", ["--run.amp=fp17"], "run.amp"),
    ("pretrain.py", ["--train.stage=2", "--train.out_dir=/nonexistent/run"], "init_from"),
    ("train_dit.py", ["--tokenizer=/nonexistent/run"], "/nonexistent/run"),
    ("evaluate.py", ["retrieval", "--ckpt=/nonexistent/run"], "/nonexistent/run"),
    ("evaluate.py", ["probe"], "eval.ckpt"),
    ("scripts/benchmark.py", ["--run.amp=fp17"], "run.amp"),
    ("scripts/preview_data.py", ["--data.dataset=jsonl"], "data.path"),
])
def test_entry_points_fail_with_one_line(script, args, flag, tmp_path):
    r = run(script, *args, f"--train.out_dir={tmp_path}" if script == "pretrain.py" and "stage" not in str(args)
            else "--eval.batch_size=4")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and flag in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_every_dataset_choice_has_a_reader():
    """The config checks data.dataset against CHOICES at start-up; data.READERS builds them: the two must agree."""
    from model import CHOICES
    assert CHOICES["data.dataset"] == ("builtin", *data.READERS)
