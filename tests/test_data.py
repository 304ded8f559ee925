"""Tests of data.py: built-in scenes, readers, tokenizers, transforms, masks and the resumable loaders."""

import gzip
import io
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import data
from model import Config, ConfigError


def small_cfg(**data_fields):
    """The tiny preset with a small batch, so a loader batch takes milliseconds."""
    cfg = Config()
    d = cfg.data
    d.batch_size, d.ssl_batch_size, d.rec_batch_size, d.num_local_crops = 8, 4, 2, 2
    d.builtin_train_size, d.builtin_val_size = 40, 12
    d.holdout = 0  # the readers' tests use all of data.path (tests/test_real_data.py covers the held-back slice)
    for k, v in data_fields.items():
        setattr(d, k, v)
    return cfg


def png_bytes(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


CORRUPT_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 this is not a jpeg"


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload if isinstance(payload, bytes) else payload.encode())


def batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# -----------------------------------------------------------------------------
# Built-in scenes


def test_builtin_is_deterministic():
    a, b = data.BuiltinScenes("train", 32, seed=3), data.BuiltinScenes("train", 32, seed=3)
    for i in (0, 5, 17):
        sa, sb = a[i], b[i]
        assert np.array_equal(np.asarray(sa["image"]), np.asarray(sb["image"]))
        assert sa["caption"] == sb["caption"] and sa["label"] == sb["label"]
    other = data.BuiltinScenes("train", 32, seed=4)
    assert [a.caption(i) for i in range(10)] != [other.caption(i) for i in range(10)]


def _positions_in(caption):
    """3x3 cells named in a caption, longest phrase first ("at the top left" is not "at the top")."""
    phrases = sorted(((p, cell) for cell, ps in data.POSITION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
    found = set()
    for phrase, cell in phrases:
        if phrase in caption:
            found.add(cell)
            caption = caption.replace(phrase, "|")
    return found


def test_builtin_captions_and_pixels_match_the_attributes():
    assert len(data.SHAPES) >= 8 and len(data.COLORS) >= 8
    ds = data.BuiltinScenes("train", 64, seed=0)
    assert ds.class_names == list(data.SHAPES)
    for i in range(60):
        scene, sample = ds.scene(i), ds[i]
        main = scene["objects"][0]
        caption = sample["caption"]
        assert sample["label"] == data.SHAPES.index(main["shape"])
        assert any(w in caption for w in data.SHAPE_WORDS[main["shape"]]), caption
        assert main["color"] in caption or "color" not in scene["mentions"]
        assert scene["background"] in caption or "background" not in caption
        # positions named in the caption are where the objects are (cells recomputed from the centres here)
        cells = {data.POSITIONS[3 * min(int(o["cy"] * 3), 2) + min(int(o["cx"] * 3), 2)] for o in scene["objects"]}
        assert _positions_in(caption) <= cells, (caption, cells)
        assert 2 * main["radius"] >= 0.8  # the labelled object spans >= 80% of the side (learnable at 32 px)
        # the pixel at the main object's centre has its colour (a ring has a hole there)
        pixel = np.asarray(sample["image"], dtype=float)[int(main["cy"] * 64), int(main["cx"] * 64)]
        dist = np.abs(pixel - data.COLORS[main["color"]]).max()
        assert (dist > 60) if main["shape"] == "ring" else (dist < 8), (i, main, pixel)


def test_builtin_captions_leave_shape_only_negatives():
    """A caption names the shape always and other attributes sometimes, so in a batch of 32 a good share of the
    negatives fit the caption in everything but the shape; with every attribute named there would be almost none."""
    ds = data.BuiltinScenes("train", 32, seed=0)
    batches = [[ds.scene(32 * b + i) for i in range(32)] for b in range(10)]
    shares = [data.shape_only_negative_share(b) for b in batches]
    assert sum(shares) / len(shares) >= 0.25, shares  # 32% measured
    assert all(any(w in s["caption"] for w in data.SHAPE_WORDS[s["objects"][0]["shape"]]) for b in batches for s in b)
    said = Counter(k for b in batches for s in b for k in s["mentions"])
    assert said["color"] > 0 and said["color"] < 320, "colour is named in some captions, not all"
    for b in batches:  # the same scenes captioned with every attribute named
        for s in b:
            s["mentions"] = ["size", "color", "position", "background"] + (["second"] if len(s["objects"]) > 1 else [])
    assert sum(data.shape_only_negative_share(b) for b in batches) / len(batches) < 0.02


def test_builtin_splits_are_disjoint_and_any_size_works():
    train, val = data.BuiltinScenes("train", 32, 1000), data.BuiltinScenes("val", 32, 100)
    train_pixels = {np.asarray(train[i]["image"]).tobytes() for i in range(100)}
    val_pixels = {np.asarray(val[i]["image"]).tobytes() for i in range(100)}
    assert len(val_pixels) == 100 and not train_pixels & val_pixels
    layouts = lambda ds: {repr(ds.scene(i)["objects"]) for i in range(100)}  # noqa: E731
    assert not layouts(train) & layouts(val)  # not just different noise: different scenes
    for size in (16, 48, 256):
        sample = data.BuiltinScenes("train", size)[7]
        assert sample["image"].size == (size, size) and sample["image"].mode == "RGB"
        assert sample["caption"] == train.caption(7)
    with pytest.raises(IndexError):
        val[100]


# -----------------------------------------------------------------------------
# Readers


def make_folder(root):
    write(root / "a" / "1.png", png_bytes("red"))
    write(root / "a" / "1.txt", "a red picture")
    write(root / "a" / "2.jpg", CORRUPT_JPEG)
    write(root / "a" / "2.txt", "a corrupt picture")
    write(root / "b" / "c" / "3.png", png_bytes("green"))
    write(root / "b" / "c" / "3.txt", "a green picture\n")
    write(root / "4.png", png_bytes("blue"))  # no caption
    write(root / "6.png", png_bytes("white"))
    write(root / "6.txt", "a white picture")


def test_folder_reader_skips_corrupt_images_and_missing_captions(tmp_path):
    make_folder(tmp_path)
    ds = data.CaptionFolder(str(tmp_path))
    assert len(ds) == 4 and ds.num_missing_caption == 1
    captions = [ds.caption(i) for i in range(len(ds))]
    assert sorted(captions) == ["a corrupt picture", "a green picture", "a red picture", "a white picture"]
    with pytest.raises(data.UnreadableSample):
        ds[captions.index("a corrupt picture")]
    assert ds[captions.index("a green picture")]["image"].getpixel((0, 0)) == (0, 128, 0)

    # the training stream replaces the corrupt sample and counts it; the eval loader drops it
    cfg = small_cfg(dataset="folder", path=str(tmp_path), val_path=str(tmp_path), batch_size=2, ssl_batch_size=1,
                    rec_batch_size=1)
    loader = data.build_pretrain_loader(cfg, data.BPETokenizer(300, 16))
    seen = [c for _ in range(4) for c in next(loader)["captions"]]  # 2 epochs of 2 batches
    assert "a corrupt picture" not in seen and set(seen) <= set(captions)
    assert loader.stream.dataset.skips.count >= 2  # at least once per epoch (a replacement may be corrupt too)
    batches = list(data.build_eval_loader(cfg, "val", 16, batch_size=3))
    assert sum(len(b["captions"]) for b in batches) == 3
    assert sorted(i for b in batches for i in b["index"].tolist()) == sorted(
        i for i, c in enumerate(captions) if c != "a corrupt picture")


def test_readers_fail_at_start_up_on_bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data.path"):
        data.build_dataset(small_cfg(dataset="folder", path=str(tmp_path / "empty")), "train")
    with pytest.raises(FileNotFoundError, match="data.path"):
        data.build_dataset(small_cfg(dataset="folder", path=str(tmp_path / "nope")), "train")
    with pytest.raises(ConfigError, match="data.val_path"):
        data.build_dataset(small_cfg(dataset="jsonl", path=str(tmp_path / "x.jsonl")), "val")
    write(tmp_path / "bad" / "1.jpg", CORRUPT_JPEG)
    write(tmp_path / "bad" / "1.txt", "a caption")
    with pytest.raises(ValueError, match="none of the first 1 samples"):
        data.build_dataset(small_cfg(dataset="folder", path=str(tmp_path / "bad")), "train")
    with pytest.raises(FileNotFoundError, match="shards do not exist"):
        data.build_dataset(small_cfg(dataset="tar", path=str(tmp_path / "{000..002}.tar")), "train")


def test_jsonl_reader(tmp_path):
    write(tmp_path / "img" / "a.png", png_bytes("red"))
    write(tmp_path / "img" / "b.jpg", CORRUPT_JPEG)
    lines = ['{"image": "img/a.png", "caption": "red"}', '{"image": "img/a.png"}', "not json",
             '{"image": "img/b.jpg", "caption": "corrupt"}', '{"image": "img/missing.png", "caption": "gone"}', ""]
    write(tmp_path / "meta" / "pairs.jsonl", "\n".join(lines))
    write(tmp_path / "meta" / "img" / "a.png", png_bytes("red"))  # paths are relative to the JSONL file
    ds = data.JsonlCaptions(str(tmp_path / "meta" / "pairs.jsonl"))
    assert len(ds) == 3 and ds.num_missing_caption == 1 and ds.num_bad_lines == 1
    assert ds[0]["caption"] == "red" and ds[0]["image"].size == (40, 30)
    for i in (1, 2):
        with pytest.raises(data.UnreadableSample):
            ds[i]


def test_imagenet_reader(tmp_path):
    for path in ("dog/a.png", "cat/b.png", "cat/sub/c.png", "great_white_shark/d.png"):
        write(tmp_path / path, png_bytes("gray"))
    ds = data.build_dataset(small_cfg(dataset="imagenet", path=str(tmp_path)), "train")
    assert ds.class_names == ["cat", "dog", "great white shark"]
    assert [ds[i]["label"] for i in range(4)] == [0, 0, 1, 2]
    assert all(ds.class_names[ds[i]["label"]] in ds[i]["caption"] for i in range(4))


def write_tar(path, samples):
    """samples: list of (key, {extension: bytes}), written as img2dataset does (key.png, key.txt, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def make_shards(folder, sizes):
    """Shards of the given sizes with unique captions, plus one key without caption and one corrupt image."""
    good = []
    for s, n in enumerate(sizes):
        samples = [(f"{s:05d}{k:04d}", {"png": png_bytes((s * 40, k * 30, 90)), "txt": f"shard {s} sample {k}".encode(),
                                        "json": b"{}"}) for k in range(n)]
        good += [f"shard {s} sample {k}" for k in range(n)]
        if s == 1:
            samples.insert(1, ("nocaption", {"png": png_bytes("red")}))
        if s == 2:
            samples.append(("corrupt", {"jpg": CORRUPT_JPEG, "txt": b"corrupt"}))
        write_tar(folder / f"{s:05d}.tar", samples)
    return good


def reader_captions(shards, epoch, rank, world_size, worker, num_workers, per_group=1, buffer=0, seed=0):
    groups = shards.reader_groups(epoch, seed, rank, world_size, worker, num_workers, per_group)
    return [s["caption"] for _, _, _, s in shards.stream(epoch, groups, seed, buffer) if s is not None]


def test_tar_shards_split_over_2_ranks_x_2_workers_cover_every_sample_once(tmp_path):
    sizes = (3, 4, 2, 5, 1)
    good = make_shards(tmp_path, sizes)
    shards = data.TarShards(str(tmp_path / f"{{00000..{len(sizes) - 1:05d}}}.tar"))
    assert len(shards.urls) == len(sizes)
    for epoch in (0, 1):
        seen = Counter()
        order = shards.epoch_order(epoch, seed=0)
        for rank in range(2):
            groups = [shards.reader_groups(epoch, 0, rank, 2, w, 2) for w in range(2)]
            # rank first: a rank reads order[rank::2] whatever its number of workers, its workers split those
            assert sorted(s for g in groups for group in g for s in group) == sorted(order[rank::2])
            for worker in range(2):
                mine = reader_captions(shards, epoch, rank, 2, worker, 2)
                assert mine, (rank, worker)  # every reader gets work
                seen.update(mine)
        assert seen == Counter(good)
    assert shards.skips.count == 4  # the caption-less and the corrupt sample, in each of 2 epochs
    assert sorted(s["caption"] for s in shards) == sorted(good)


def test_tar_loader_needs_a_shard_per_reader(tmp_path):
    make_shards(tmp_path, (2, 2, 3))
    cfg = small_cfg(dataset="tar", path=str(tmp_path / "{00000..00002}.tar"), batch_size=2, ssl_batch_size=1,
                    rec_batch_size=1, num_workers=2)
    tok = data.BPETokenizer(300, 16)
    with pytest.raises(ConfigError, match=r"data.path has 3 tar shards but 2 process\(es\) x 2 reader\(s\) "
                                          r"\(data.num_workers=2\) = 4 readers .* lower data.num_workers"):
        data.build_pretrain_loader(cfg, tok, rank=0, world_size=2)
    cfg.data.num_workers = 0
    for rank in range(3):  # 3 x 1 readers fit
        assert next(data.build_pretrain_loader(cfg, tok, rank, world_size=3))["captions"]


def test_brace_expansion():
    assert data.expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert data.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]


# -----------------------------------------------------------------------------
# Tokenizers

EDGE_CASES = ["", " ", "hello world", "Hello  World!!", "ünïcödé — naïve café", "日本語のテキスト",
              "emoji 🐶🎉 dog", "tabs\tand\nnew lines  ", "\x00nul byte", "x" * 300, "it's 3:45 pm, isn't it?"]


def test_bpe_train_hand_worked_merges():
    tok = data.BPETokenizer(260, 8).train(["ab ab ab cd"])
    # chunks "ab", " ab" x2, " cd": (a,b) occurs 3 times -> 256; then (" ", 256) twice -> 257
    assert tok.merges == [(97, 98), (32, 256)]
    assert tok.encode("ab ab") == [256, 257] and tok.decode([256, 257]) == "ab ab"
    assert (tok.sot_id, tok.eot_id) == (258, 259)


def test_bpe_round_trips_state_dict_and_pickle(tmp_path):
    captions = [data.BuiltinScenes("train", 32).caption(i) for i in range(300)] + EDGE_CASES
    tok = data.BPETokenizer(400, 32).train(captions)
    assert len(tok.merges) == 400 - 258 and tok.eot_id == 399 == tok.vocab_size - 1
    for text in EDGE_CASES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(0 <= i < tok.sot_id for i in ids)
    caption = captions[0]
    assert len(tok.encode(caption)) < len(caption.encode()) / 2  # it learned the caption vocabulary
    for other in (data.tokenizer_from_state(tok.state_dict()), pickle.loads(pickle.dumps(tok))):
        assert all(other.encode(t) == tok.encode(t) for t in EDGE_CASES + captions[:20])
        assert torch.equal(other(captions[:4]), tok(captions[:4]))
    # a state_dict holds only plain python types, so it loads from a weights_only checkpoint
    torch.save({"tokenizer": tok.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert data.tokenizer_from_state(state).encode(caption) == tok.encode(caption)


def test_tokenizer_call_pads_and_truncation_keeps_the_end_token():
    tok = data.BPETokenizer(300, 8)  # untrained: one id per byte
    rows = tok(["ab", "abcdefghijkl", ""])
    assert rows.shape == (3, 8) and rows.dtype == torch.long
    assert rows[0].tolist() == [298, 97, 98, 299, 0, 0, 0, 0]
    assert rows[1].tolist() == [298, 97, 98, 99, 100, 101, 102, 299]  # truncated, the end token kept
    assert rows[2].tolist() == [298, 299, 0, 0, 0, 0, 0, 0]
    assert rows.argmax(dim=-1).tolist() == [3, 7, 1]  # pooling at the argmax finds the end token
    assert tok.decode(rows[0].tolist()) == "ab"


def write_tiny_clip_merges(path):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nh e\nl l\nhe ll\nhell o</w>\n")


def test_clip_merges_file_gives_hand_checked_ids(tmp_path):
    write_tiny_clip_merges(tmp_path / "merges.txt.gz")
    tok = data.BPETokenizer.from_clip_merges(str(tmp_path / "merges.txt.gz"), context_length=6)
    # 256 bytes + 256 `</w>` bytes + 4 merges (512..515) + start 516 + end 517
    assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (518, 516, 517)
    # byte ids are ranks in CLIP's byte order: '!' = 0 ... 'h' = 104 - 33 = 71; a word's last byte + 256
    assert tok.encode("Hello") == [515]  # h e -> he, l l -> ll, he ll -> hell, hell o</w> -> hello</w>
    assert tok.encode("hi") == [71, 256 + 72]
    assert tok.encode("  HELLO   hello! ") == [515, 515, 256]  # lower-cased, whitespace cleaned, '!</w>' = 256
    assert tok.encode("&amp;") == [256 + 5]  # HTML unescaped to '&' (38 -> rank 5)
    assert tok.encode("it's") == [72, 256 + 83, 6, 256 + 82]  # "it" + "'s"
    assert tok.encode("é") == [127, 256 + 102]  # UTF-8 c3 a9: printable ranks 106 + (195-174), 94 + (169-161)
    assert tok.encode("\x01") == [256 + 189]  # non-printable bytes follow the 188 printable ones
    assert tok(["hello", "hi hi hi"]).tolist() == [[516, 515, 517, 0, 0, 0], [516, 71, 328, 71, 328, 517]]
    assert tok.decode([515, 256]) == "hello ! "
    assert data.tokenizer_from_state(tok.state_dict()).encode("hello hi") == [515, 71, 328]


def test_build_tokenizer(tmp_path):
    cfg = small_cfg()
    tok = data.build_tokenizer(cfg)
    assert (tok.vocab_size, tok.eot_id, tok.context_length) == (1024, 1023, 32)
    caption = data.BuiltinScenes("train", 32).caption(0)
    assert tok.decode(tok(caption)[0].tolist()) == caption and len(tok.encode(caption)) <= 12
    write_tiny_clip_merges(tmp_path / "merges.txt.gz")
    cfg.text.tokenizer = str(tmp_path / "missing.txt.gz")
    with pytest.raises(ConfigError, match="text.tokenizer"):
        data.build_tokenizer(cfg)
    cfg.text.tokenizer = str(tmp_path / "merges.txt.gz")
    with pytest.raises(ConfigError, match="text.vocab_size=1024"):
        data.build_tokenizer(cfg)
    cfg.text.vocab_size = 518
    assert data.build_tokenizer(cfg).encode("hello") == [515]


# -----------------------------------------------------------------------------
# Transforms, multi-crop and masks


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_normalize_and_to_tensor():
    x = data.to_tensor(noise_image(20, 10))
    assert x.shape == (3, 10, 20) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(data.normalize(mean), torch.zeros(3, 4, 4), atol=1e-6)
    assert torch.allclose(data.normalize(torch.ones(2, 3, 1, 1))[0, :, 0, 0],
                          (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD))
    batch = torch.rand(2, 3, 5, 5)
    assert torch.allclose(data.denormalize(data.normalize(batch)), batch, atol=1e-6)


def test_adm_center_crop_and_resize():
    wide = Image.new("RGB", (400, 100), "black")
    wide.paste((255, 255, 255), (200, 0, 400, 100))  # right half white
    out = data.adm_center_crop(wide, 32)
    assert out.size == (32, 32)
    row = np.asarray(out)[16, :, 0]
    assert row[:14].max() < 20 and row[18:].min() > 235  # the black/white edge stays in the middle
    for size in ((1000, 700), (50, 80), (32, 32)):
        assert data.adm_center_crop(noise_image(*size), 32).size == (32, 32)
    assert data.resize(noise_image(50, 20), 24).size == (24, 24)


def test_random_resized_crop():
    img = noise_image(60, 60)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a, b = data.random_resized_crop(img, 16, g(), (0.3, 1.0)), data.random_resized_crop(img, 16, g(), (0.3, 1.0))
    assert a.size == (16, 16) and a.tobytes() == b.tobytes()
    full = data.random_resized_crop(img, 16, g(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert full.tobytes() == data.resize(img, 16).tobytes()
    # no 0.9-area square fits a 100x10 image: the fallback is the centred 10x10 square
    thin = noise_image(100, 10)
    out = data.random_resized_crop(thin, 8, g(), scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert out.tobytes() == thin.resize((8, 8), Image.Resampling.BICUBIC, box=(45, 0, 55, 10)).tobytes()


def test_photometric_transforms():
    img, g = noise_image(24, 16), torch.Generator().manual_seed(0)
    arr = np.asarray(img)
    assert np.array_equal(np.asarray(data.hflip(img)), arr[:, ::-1])
    assert data.color_jitter(img, g, 0, 0, 0, 0).tobytes() == img.tobytes()
    jittered = data.color_jitter(img, g)
    assert jittered.size == img.size and jittered.mode == "RGB" and jittered.tobytes() != img.tobytes()
    green = np.asarray(data.adjust_hue(Image.new("RGB", (2, 2), (255, 0, 0)), 1 / 3))[0, 0]
    assert green[1] > 240 and green[0] < 15 and green[2] < 15
    gray = np.asarray(data.grayscale(img))
    assert gray.shape == arr.shape and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    blurred = np.asarray(data.gaussian_blur(img, g, (1.5, 2.0)))
    assert blurred.shape == arr.shape and blurred.std() < 0.5 * arr.std()
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (1, 1)).repeat(3).reshape(1, 256, 3))
    x = np.arange(256)
    assert np.array_equal(np.asarray(data.solarize(ramp))[0, :, 0], np.where(x < 128, x, 255 - x))


def test_multicrop_sizes():
    cfg = small_cfg()
    assert data.local_crop_size(cfg) == 16  # 32 px, patch 4: 4 * round(8 * 7/16)
    cfg.encoder.image_size, cfg.encoder.patch_size = 256, 16
    assert data.local_crop_size(cfg) == 112
    crops = data.multicrop(noise_image(50, 40), torch.Generator().manual_seed(0), 32, 16, 3)
    assert [c.size for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 3


def test_multicrop_keeps_orientation():
    ramp = Image.fromarray(np.repeat(np.linspace(0, 255, 40, dtype=np.uint8)[:, None], 40, 1)).convert("RGB")
    for seed in range(10):  # flips are horizontal and nothing but solarize (global crop 2) inverts values
        crops = data.multicrop(ramp, torch.Generator().manual_seed(seed), 24, 12, 4)
        for c in [crops[0]] + crops[2:]:
            x = np.asarray(c, dtype=float)
            assert x[0].mean() < x[-1].mean(), seed


def test_multicrop_colour_augmentation_follows_its_arguments():
    red = Image.new("RGB", (40, 40), (200, 40, 40))
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    gray = lambda c: np.ptp(np.asarray(c, dtype=int), axis=-1).max() == 0  # noqa: E731  R = G = B everywhere
    for seed in range(5):
        assert all(gray(c) for c in data.multicrop(red, g(seed), 24, 12, 4, grayscale_p=1.0))
        assert not any(gray(c) for c in data.multicrop(red, g(seed), 24, 12, 4, jitter=(0, 0, 0, 0), grayscale_p=0.0))
    # the hue shift: DINOv2's 0.1 turn keeps a red object red in every crop, 0.5 turns it any hue
    def red_share(jitter):
        crops = [c for seed in range(20) for c in data.multicrop(red, g(seed), 24, 12, 4, jitter=jitter,
                                                                  grayscale_p=0.0)]
        return np.mean([np.argmax(np.asarray(c, dtype=float).mean(axis=(0, 1))) == 0 for c in crops])
    assert red_share(data.COLOR_JITTER) > 0.75 and red_share((0.4, 0.4, 0.4, 0.5)) < 0.6


def test_batch_maker_stacks_crops_crop_major():
    cfg = small_cfg()
    cfg.data.color_jitter, cfg.data.grayscale_p = (0.4, 0.4, 0.4, 0.5), 0.5  # not DINOv2's: the maker must pass them
    maker = data.BatchMaker(cfg, data.BPETokenizer(300, 32))
    ds = data.BuiltinScenes("train", 32, 40)
    samples, seeds = [ds[i] for i in range(8)], list(range(100, 108))
    batch = maker(samples, seeds, batch_seed=7)
    B_ssl = len(batch["ssl_index"])
    for k, i in enumerate(batch["ssl_index"].tolist()):
        crops = data.multicrop(samples[i]["image"], torch.Generator().manual_seed(seeds[i]), 32, 16, 2,
                               cfg.data.global_crop_scale, cfg.data.local_crop_scale, blur_sigma=maker.blur_sigma,
                               jitter=cfg.data.color_jitter, grayscale_p=cfg.data.grayscale_p)
        assert torch.equal(batch["global_crops"][k], data._to_uint8(crops[0]))  # the crop's own pixels, as uint8
        assert torch.equal(batch["global_crops"][B_ssl + k], data._to_uint8(crops[1]))
        for c in range(2):
            assert torch.equal(batch["local_crops"][c * B_ssl + k], data._to_uint8(crops[2 + c]))
    batches_equal(batch, maker(samples, seeds, batch_seed=7))  # a pure function of the seeds


def test_batch_to_device_normalizes_like_the_float_pipeline():
    """The worker's uint8 batch, normalized by batch_to_device, equals the ImageNet-normalized float32 stacks that
    the loader made before (`_stack_normalized` of the same crops) to float32 rounding."""
    cfg = small_cfg()
    maker = data.BatchMaker(cfg, data.BPETokenizer(300, 32))
    ds = data.BuiltinScenes("train", 32, 40)
    samples, seeds = [ds[i] for i in range(8)], list(range(8))
    batch = maker(samples, seeds, batch_seed=3)
    out = data.batch_to_device(batch, torch.device("cpu"))
    assert out is not batch and batch["images"].dtype == torch.uint8 and "rec_images" not in batch  # input kept
    views = [data.multicrop(samples[i]["image"], torch.Generator().manual_seed(seeds[i]), 32, 16, 2,
                            cfg.data.global_crop_scale, cfg.data.local_crop_scale, blur_sigma=maker.blur_sigma,
                            jitter=cfg.data.color_jitter, grayscale_p=cfg.data.grayscale_p)
             for i in batch["ssl_index"].tolist()]
    images = data._stack_normalized([data.adm_center_crop(s["image"], 32) for s in samples])
    expect = {"images": images, "rec_images": images[batch["rec_index"]],
              "global_crops": data._stack_normalized([v[0] for v in views] + [v[1] for v in views]),
              "local_crops": data._stack_normalized([v[2 + c] for c in range(2) for v in views])}
    for key, x in expect.items():
        assert out[key].dtype == torch.float32 and out[key].shape == x.shape, key
        assert (out[key] - x).abs().max() <= 1e-6, key
    for key in ("tokens", "masks", "mask_indices", "mask_weight", "ssl_index", "rec_index", "labels"):
        assert torch.equal(out[key], batch[key]), key
    assert out["captions"] is batch["captions"]  # non-tensors pass through
    synthetic = {"images": torch.randn(2, 3, 4, 4), "rec_images": torch.randn(1, 3, 4, 4)}
    assert all(torch.equal(v, synthetic[k]) for k, v in data.batch_to_device(synthetic, "cpu").items())


def test_mask_indices_have_a_static_shape():
    """mask_indices / mask_weight are padded to M_max = int(2*B_ssl*mask_prob) * int(mask_ratio[1]*N) whatever the
    masks: the masked patches first (as masks.flatten().nonzero()), then index 0 with weight 0."""
    cfg = small_cfg(mask_ratio=(0.1, 0.45))  # N = 64: cap = int(0.45 * 64) = 28 patches per crop
    maker = data.BatchMaker(cfg, data.BPETokenizer(300, 32))
    ds = data.BuiltinScenes("train", 32, 40)
    samples = [ds[i] for i in range(8)]
    M_max = int(2 * 4 * 0.5) * 28
    counts = set()
    for batch_seed in range(6):
        batch = maker(samples, list(range(8)), batch_seed)
        masks, idx, weight = batch["masks"], batch["mask_indices"], batch["mask_weight"]
        assert idx.shape == weight.shape == (M_max,) and idx.dtype == torch.long and weight.dtype == torch.float32
        real = masks.flatten().nonzero().flatten()
        M = len(real)
        counts.add(M)
        assert torch.equal(idx[:M], real) and (idx[M:] == 0).all() and (weight[M:] == 0).all()
        assert (weight[:M] > 0).all()
        per_crop = torch.zeros(len(masks)).index_add_(0, idx // masks.shape[1], weight)  # padding adds 0 to crop 0
        has_mask = masks.any(1)
        assert torch.allclose(per_crop[has_mask], torch.ones(int(has_mask.sum())))
        assert (per_crop[~has_mask] == 0).all() and weight.sum().item() == pytest.approx(int(has_mask.sum()))
    assert len(counts) > 1  # the masked count varies, the shape does not
    cfg.data.mask_prob = 0.0
    batch = data.BatchMaker(cfg, data.BPETokenizer(300, 32))(samples, list(range(8)), 0)
    assert batch["mask_indices"].shape == batch["mask_weight"].shape == (0,)


@pytest.mark.parametrize("grid", [8, 16])
def test_masks_ratios_and_blocks(grid):
    g = torch.Generator().manual_seed(grid)
    N = grid * grid
    for _ in range(5):
        masks = data.make_masks(32, grid, 0.5, (0.1, 0.5), 4, (0.3, 3.33), g)
        assert masks.shape == (32, N) and masks.dtype == torch.bool
        counts = masks.sum(1)
        assert (counts > 0).sum() == 16  # mask_prob of the crops are masked, the others not at all
        ratios = counts[counts > 0].float() / N
        assert ratios.min() >= 0.1 and ratios.max() <= 0.5
        assert ratios.min() < 0.2 and ratios.max() > 0.4  # spread over the whole range
        for m in masks[counts > 0]:
            labels, n = ndimage.label(m.view(grid, grid).numpy())
            assert min(np.bincount(labels.ravel())[1:]) >= 4  # every block has >= 4 patches
    assert data.make_masks(4, grid, 0.0, (0.1, 0.5), 4, (0.3, 3.33), g).sum() == 0


# -----------------------------------------------------------------------------
# Loaders


def test_pretrain_batch_layout():
    cfg = small_cfg()
    tok = data.BPETokenizer(300, 32)
    batch = next(data.build_pretrain_loader(cfg, tok))
    assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["tokens"].shape == (8, 32) and (batch["tokens"].argmax(-1) > 0).all()
    assert len(batch["captions"]) == 8 and batch["labels"].shape == (8,)
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["local_crops"].shape == (8, 3, 16, 16)
    assert batch["global_crops"].dtype == batch["local_crops"].dtype == torch.uint8
    assert batch["masks"].shape == (8, 64) and batch["masks"].dtype == torch.bool
    M = int(batch["masks"].sum())
    assert batch["mask_indices"].shape == batch["mask_weight"].shape == (4 * 32,)  # 4 masked crops x int(0.5 * 64)
    assert torch.equal(batch["mask_indices"][:M], batch["masks"].flatten().nonzero().flatten())
    assert len(set(batch["ssl_index"].tolist())) == 4 and len(set(batch["rec_index"].tolist())) == 2
    assert "rec_images" not in batch  # gathered on the device from images
    on_device = data.batch_to_device(batch, torch.device("cpu"))
    assert torch.equal(on_device["rec_images"], on_device["images"][batch["rec_index"]])
    for key in ("images", "global_crops", "local_crops", "rec_images"):
        x = data.denormalize(on_device[key])
        assert on_device[key].dtype == torch.float32 and x.min() > -1e-4 and x.max() < 1 + 1e-4, key
    # the CLIP images are the ADM centre crops of the samples, labels their shapes
    cfg.data.num_local_crops = 0
    batch = next(data.build_pretrain_loader(cfg, tok))
    assert batch["local_crops"].shape == (0, 3, 16, 16) and batch["local_crops"].dtype == torch.uint8
    ds = data.BuiltinScenes("train", 32, 40)
    by_caption = {ds.caption(i): i for i in range(40)}
    for row, caption in enumerate(batch["captions"]):
        sample = ds[by_caption[caption]]
        expect = data._to_uint8(data.adm_center_crop(sample["image"], 32))
        assert torch.equal(batch["images"][row], expect) and batch["labels"][row] == sample["label"]


def test_loader_resume_continues_exactly():
    cfg = small_cfg()  # 40 scenes, batch 8: 5 batches per epoch, so the resumed part crosses an epoch
    tok = data.BPETokenizer(300, 32)
    full = data.build_pretrain_loader(cfg, tok)
    reference = [next(full) for _ in range(7)]
    first = data.build_pretrain_loader(cfg, tok)
    for _ in range(4):
        next(first)
    state = first.state_dict()
    assert state == {"epoch": 0, "offset": 32}
    resumed = data.build_pretrain_loader(cfg, tok)
    resumed.load_state_dict(state)
    for k in range(4, 7):
        batches_equal(next(resumed), reference[k])
    assert resumed.state_dict()["epoch"] == 1
    assert sorted(c for b in reference[:5] for c in b["captions"]) == sorted(
        data.BuiltinScenes("train", 32, 40).caption(i) for i in range(40))  # an epoch sees every scene once


def test_loader_stream_does_not_depend_on_num_workers():
    tok = data.BPETokenizer(300, 32)
    plain = data.build_pretrain_loader(small_cfg(), tok)
    workers = data.build_pretrain_loader(small_cfg(num_workers=2), tok)
    for _ in range(3):
        batches_equal(next(plain), next(workers))
    state = workers.state_dict()
    resumed = data.build_pretrain_loader(small_cfg(), tok)
    resumed.load_state_dict(state)
    batches_equal(next(resumed), next(plain))


def write_caption_folder(folder, n):
    """n one-colour PNGs with captions "caption i"."""
    for i in range(n):
        write(folder / f"{i}.png", png_bytes((i * 10, 0, 0)))
        write(folder / f"{i}.txt", f"caption {i}")


def test_ddp_ranks_get_disjoint_samples(tmp_path):
    write_caption_folder(tmp_path, 12)
    cfg = small_cfg(dataset="folder", path=str(tmp_path), batch_size=3, ssl_batch_size=1, rec_batch_size=1)
    tok = data.BPETokenizer(300, 16)
    per_rank = []
    for rank in range(2):
        loader = data.build_pretrain_loader(cfg, tok, rank, 2)
        per_rank.append([c for _ in range(2) for c in next(loader)["captions"]])  # one epoch: 12 / (3 * 2)
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"caption {i}" for i in range(12))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_tar_loader_resume(tmp_path, num_workers):
    good = make_shards(tmp_path, (3, 4, 2, 5))
    cfg = small_cfg(dataset="tar", path=str(tmp_path / "{00000..00003}.tar"), batch_size=2, ssl_batch_size=1,
                    rec_batch_size=1, num_local_crops=1, num_workers=num_workers)
    tok = data.BPETokenizer(300, 16)
    full = data.build_pretrain_loader(cfg, tok)
    reference = [next(full) for _ in range(8)]
    assert all(c in good for b in reference for c in b["captions"])
    if num_workers == 0:  # one reader: the first epoch (14 samples) comes in full before the next one starts
        assert sorted(c for b in reference[:7] for c in b["captions"]) == sorted(good)
    first = data.build_pretrain_loader(cfg, tok)
    for _ in range(3):
        next(first)
    resumed = data.build_pretrain_loader(cfg, tok)
    resumed.load_state_dict(first.state_dict())
    for k in range(3, 8):
        batches_equal(next(resumed), reference[k])


def test_eval_loader_shards_ranks_in_a_fixed_order():
    cfg = small_cfg()
    ds = data.BuiltinScenes("val", 48, 12)
    seen = {}
    for rank in range(2):
        batches = list(data.build_eval_loader(cfg, "val", 48, batch_size=4, rank=rank, world_size=2, max_images=10))
        assert [len(b["index"]) for b in batches] == [4, 1]
        for b in batches:
            assert b["images"].shape[1:] == (3, 48, 48)
            for row, i in enumerate(b["index"].tolist()):
                seen[i] = rank
                expect = data.normalize(data.to_tensor(ds[i]["image"]))
                assert torch.allclose(b["images"][row], expect, atol=1e-5)
                assert b["labels"][row] == ds[i]["label"] and b["captions"][row] == ds[i]["caption"]
    assert seen == {i: i % 2 for i in range(10)}


def test_eval_loader_squash_keeps_the_whole_image(tmp_path):
    """A wide image: the ADM crop keeps its centre only, the squash (zero-shot protocol) keeps both ends."""
    img = Image.new("RGB", (64, 16), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # a red square at the left end
    img.save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide image")
    cfg = small_cfg(dataset="folder", path=str(tmp_path), val_path=str(tmp_path))
    crop = next(iter(data.build_eval_loader(cfg, "val", 16, 1)))["images"]
    squash = next(iter(data.build_eval_loader(cfg, "val", 16, 1, squash=True)))["images"]
    red = lambda x: data.denormalize(x)[0, 0, :, :3].mean().item()  # noqa: E731  left columns, red channel
    assert red(crop) < 0.05 and red(squash) > 0.9
