"""Tests of model.py: config and CLI, networks, the VTP API, safetensors and checkpoint loading."""

import json
import math
import re

import pytest
import torch
import torch.nn as nn

from model import (PRESETS, VTP, Attention, Config, ConfigError, DINOHead, RopeEmbedding, TextAttention,
                   amp_setup, apply_rope, drop_path_scales, ema_update, load_official_vtp, load_safetensors, load_vtp,
                   parameter_counts, parse_config, resolve_checkpoint, save_checkpoint, save_safetensors)


def small_cfg(**enc):
    """A fast tiny config (depth 2 everywhere) for tests."""
    cfg = PRESETS["tiny"]()
    cfg.encoder.depth = cfg.decoder.depth = cfg.text.depth = 2
    for k, v in enc.items():
        setattr(cfg.encoder, k, v)
    return cfg


# --- presets and parameter counts ---

RELEASED = {  # encoder, total (encoder + decoder + text + projection) of the released checkpoints, in millions
    "S": (21.6, 167.2), "B": (85.7, 295.6), "L": (303.5, 731.6),
}


@pytest.mark.parametrize("name", ["S", "B", "L"])
def test_released_presets_parameter_counts(name):
    cfg = PRESETS[name]()
    with torch.device("meta"):
        model = VTP(cfg)
    counts = parameter_counts(model)
    enc, total = RELEASED[name]
    assert abs(counts["encoder"] / 1e6 - enc) < 0.1
    assert abs(counts["total"] / 1e6 - total) < 0.1
    assert abs(counts["text"] / 1e6 - 123.7) < 0.1  # the same CLIP text tower for S, B and L
    # shapes of the released layout
    sd = model.state_dict()
    D = cfg.encoder.width
    assert sd["trunk.patch_embed.proj.weight"].shape == (D, 3, 16, 16)
    assert sd["trunk.feature_bottleneck.weight"].shape == (64, D)
    assert sd["pixel_decoder.proj_out.weight"].shape == (3 * 16 * 16, D, 1, 1)
    assert sd["trunk.rope_embed.periods"].dtype == torch.bfloat16


def test_tiny_preset_shapes_and_size():
    cfg = PRESETS["tiny"]()
    model = VTP(cfg)
    n = parameter_counts(model)["total"]
    assert 1e6 < n < 10e6, "tiny should have a few million parameters"
    x = torch.randn(2, 3, 32, 32)
    z = model.encode(x)
    assert z.shape == (2, cfg.encoder.latent_dim, 8, 8)
    # ~12x compression like the paper's f16d64 (3*256*256 / (64*16*16) = 12)
    assert 3 * 32 * 32 / z[0].numel() == 12
    assert model.decode(z).shape == x.shape
    assert model.image_features(x).shape == (2, cfg.text.embed_dim)
    tokens = torch.randint(0, cfg.text.vocab_size, (2, cfg.text.context_length))
    assert model.text_features(tokens).shape == (2, cfg.text.embed_dim)
    f = model.features(x)
    assert f["cls"].shape == (2, cfg.encoder.width) and f["patches"].shape == (2, 64, cfg.encoder.width)


def test_api_any_resolution_and_normalization():
    cfg = small_cfg()
    model = VTP(cfg).eval()
    x = torch.randn(1, 3, 48, 64)  # not the training size, not square
    z = model.encode(x)
    assert z.shape == (1, cfg.encoder.latent_dim, 12, 16)
    assert model.decode(z).shape == x.shape
    assert torch.allclose(model.image_features(x).norm(dim=-1), torch.ones(1), atol=1e-5)
    raw = model.image_features(x, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(1), atol=1e-3)


def test_intermediate_layers_last_equals_features():
    model = VTP(small_cfg()).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = model.intermediate_layers(x, 2)
    f = model.features(x)
    assert len(layers) == 2
    assert torch.allclose(layers[-1]["cls"], f["cls"]) and torch.allclose(layers[-1]["patches"], f["patches"])
    assert not torch.allclose(layers[0]["cls"], f["cls"])


# --- RoPE and attention ---

def test_rope_preserves_norms():
    rope = RopeEmbedding(16, dtype="fp32")(4, 4)
    x = torch.randn(2, 3, 1 + 16, 16)
    y = apply_rope(x, rope)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(y[:, :, 0], x[:, :, 0]), "[CLS] (the prefix token) must not be rotated"
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])


def test_rope_scores_depend_only_on_coordinate_differences():
    H = W = 6
    sin, cos = RopeEmbedding(16, dtype="fp32")(H, W)
    q, k = torch.randn(16), torch.randn(16)
    qs = apply_rope(q.expand(1, 1, H * W, 16), (sin, cos))[0, 0]  # q at every position, (HW, hd)
    ks = apply_rope(k.expand(1, 1, H * W, 16), (sin, cos))[0, 0]
    idx = lambda y, x: y * W + x
    for (dy, dx) in [(1, 2), (3, -1), (0, 4)]:
        scores = [qs[idx(y, x)] @ ks[idx(y + dy, x + dx)] for y in range(H) for x in range(W)
                  if 0 <= y + dy < H and 0 <= x + dx < W]
        scores = torch.stack(scores)
        assert torch.allclose(scores, scores[0].expand_as(scores), atol=1e-4)
    # and they do depend on the difference
    assert not torch.isclose(qs[idx(0, 0)] @ ks[idx(0, 1)], qs[idx(0, 0)] @ ks[idx(2, 3)], atol=1e-3)


def test_rope_matches_recipe_formula():
    hd, H, W = 8, 2, 3
    sin, cos = RopeEmbedding(hd, base=100.0, dtype="fp32")(H, W)
    periods = torch.tensor([100 ** (2 * i / (hd // 2)) for i in range(hd // 4)])
    y, x = 1, 2  # token index y*W + x
    cy, cx = 2 * (y + 0.5) / H - 1, 2 * (x + 0.5) / W - 1
    ang = torch.cat([2 * math.pi * cy / periods, 2 * math.pi * cx / periods])
    ang = torch.cat([ang, ang])
    assert torch.allclose(cos[y * W + x], torch.cos(ang), atol=1e-6)
    assert torch.allclose(sin[y * W + x], torch.sin(ang), atol=1e-6)


def test_attention_equals_plain_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=False)
    x = torch.randn(2, 9, 32)
    rope = RopeEmbedding(8, dtype="fp32")(2, 4)
    out = attn(x, rope)
    # reference: explicit softmax(q k^T / sqrt(hd)) v
    qkv = attn.qkv(x).reshape(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k, v = apply_rope(qkv[0], rope), apply_rope(qkv[1], rope), qkv[2]
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    ref = attn.proj((p @ v).transpose(1, 2).reshape(2, 9, 32))
    assert torch.allclose(out, ref, atol=1e-5)


def test_qk_norm_switch():
    assert "trunk.blocks.0.attn.q_norm.weight" not in VTP(small_cfg()).state_dict()
    sd = VTP(small_cfg(qk_norm=True)).state_dict()
    e = small_cfg().encoder
    assert sd["trunk.blocks.0.attn.q_norm.weight"].shape == (e.width // e.num_heads,)


def test_text_attention_equals_nn_multihead_attention():
    torch.manual_seed(0)
    ours = TextAttention(32, 4)
    nn.init.normal_(ours.in_proj_weight, std=0.2)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())  # same parameter names as torch's module
    x = torch.randn(2, 7, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1)
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    assert torch.allclose(ours(x), expected, atol=1e-5)


def test_text_features_pool_at_end_of_text_and_are_causal():
    torch.manual_seed(0)
    model = VTP(small_cfg()).eval()
    V = model.token_embedding.num_embeddings
    a = torch.tensor([[V - 2, 5, 6, V - 1, 0, 0, 0, 0]])
    b = a.clone()
    b[0, 5] = 7  # a change after the end token must not change the feature (causal mask + argmax pooling)
    c = a.clone()
    c[0, 1] = 8  # a change before it must
    fa, fb, fc = (model.text_features(t) for t in (a, b, c))
    assert torch.allclose(fa, fb, atol=1e-6)
    assert not torch.allclose(fa, fc, atol=1e-4)


# --- encoder: masks and lists of crops ---

def test_mask_replaces_exactly_the_masked_tokens():
    torch.manual_seed(0)
    trunk = VTP(small_cfg()).trunk
    nn.init.normal_(trunk.mask_token, std=1.0)
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, [3, 10, 11]] = True
    masks[1, 60] = True
    plain, _ = trunk.prepare_tokens(x)
    masked, _ = trunk.prepare_tokens(x, masks)
    changed = (plain != masked).any(-1)[:, 1:]  # (B, N) which patch tokens changed
    assert torch.equal(changed, masks)
    assert torch.allclose(masked[0, 1 + 3], trunk.mask_token[0])
    assert torch.equal(plain[:, 0], masked[:, 0]), "[CLS] is never masked"


def test_list_of_crops_equals_separate_forwards():
    torch.manual_seed(0)
    trunk = VTP(small_cfg()).trunk.eval()
    g = torch.randn(3, 3, 32, 32)
    loc = torch.randn(3, 3, 16, 16)
    m = torch.rand(3, 64) < 0.3
    outs = trunk.forward_features([g, loc], masks=[m, None])
    ref_g = trunk.forward_features(g, masks=m)
    ref_l = trunk.forward_features(loc)
    assert torch.allclose(outs[0]["cls"], ref_g["cls"], atol=1e-6)
    assert torch.allclose(outs[1]["patches"], ref_l["patches"], atol=1e-6)
    assert outs[1]["patches"].shape == (3, 16, trunk.cls_token.shape[-1])


def test_drop_path_is_sample_level_and_only_in_training():
    torch.manual_seed(0)
    trunk = VTP(small_cfg()).trunk
    x = torch.randn(8, 3, 32, 32)
    trunk.eval()
    a = trunk.forward_features(x, drop_path_rate=0.5)["cls"]
    b = trunk.forward_features(x)["cls"]
    assert torch.allclose(a, b), "stochastic depth must be off in eval mode"
    trunk.train()
    c = trunk.forward_features(x, drop_path_rate=0.5)["cls"]
    assert not torch.allclose(c, b)


def test_drop_path_draws_only_from_the_given_generator():
    state = torch.get_rng_state()
    a = drop_path_scales(3, 64, 0.5, True, torch.Generator().manual_seed(1))  # (blocks, branches, B, 1, 1)
    assert torch.equal(torch.get_rng_state(), state), "the global generator is not touched"
    assert a.shape == (3, 2, 64, 1, 1)
    assert torch.equal(a, drop_path_scales(3, 64, 0.5, True, torch.Generator().manual_seed(1)))  # same seed
    assert not torch.equal(a, drop_path_scales(3, 64, 0.5, True, torch.Generator().manual_seed(2)))
    assert set(a.flatten().tolist()) == {0.0, 2.0}  # a branch dropped, or kept and rescaled by 1/(1-p)
    assert drop_path_scales(3, 64, 0.5, False) is None and drop_path_scales(3, 64, 0.0, True) is None
    # a trunk's forward draws once for all its blocks: the same seed gives the same features
    torch.manual_seed(0)
    trunk = VTP(small_cfg()).trunk.train()
    imgs = torch.randn(8, 3, 32, 32)
    f = [trunk.forward_features(imgs, drop_path_rate=0.5, generator=torch.Generator().manual_seed(s))["cls"]
         for s in (3, 3, 4)]
    assert torch.equal(f[0], f[1]) and not torch.equal(f[0], f[2])


def test_dropped_branch_leaves_the_sample_unchanged():
    """Sample-level stochastic depth: a sample whose two branches of a block are dropped passes through it as is."""
    torch.manual_seed(0)
    blk = VTP(small_cfg()).trunk.blocks[0]
    x = torch.randn(4, 5, blk.norm1.weight.shape[0])
    scale = torch.tensor([[0.0, 2.0, 0.0, 2.0]] * 2).view(2, 4, 1, 1)  # samples 0 and 2 dropped in both branches
    y, full = blk(x, None, scale), blk(x)
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    assert not torch.allclose(y[1], full[1])  # kept samples' branches are rescaled by 1/(1-p)


def test_decoder_1x1_convs_run_as_linears_with_gradients_in_the_parameter_layout():
    """proj_in and proj_out run as Linears over channels: the outputs of the released 1x1 convs, and weight gradients
    in the parameters' own layout on a latent map that is a transposed token view (as encode() returns it), where the
    convs returned channels-last weight gradients from 16 images on (which DDP warns about and copies)."""
    torch.manual_seed(0)
    cfg = small_cfg()
    vtp = VTP(cfg)
    dec = vtp.pixel_decoder
    z = vtp.trunk.latents(torch.randn(16, 64, cfg.encoder.width), (8, 8)).detach().requires_grad_()
    x = dec(z)
    h = dec.proj_in(z).flatten(2).transpose(1, 2)  # the forward again, with the convs as released
    for blk in dec.blocks:
        h = blk(h, dec.rope_embed(8, 8))
    conv_out = dec.pixel_shuffle(dec.proj_out(dec.norm(h).transpose(1, 2).reshape(16, -1, 8, 8)))
    assert x.shape == (16, 3, 32, 32) and torch.allclose(x, conv_out, atol=1e-5)
    x.square().mean().backward()
    for w in (dec.proj_in.weight, dec.proj_out.weight):
        assert w.grad.shape == w.shape and w.shape[2:] == (1, 1) and w.grad.stride() == w.stride()


def test_amp_setup_is_the_one_mixed_precision_switch():
    cpu = torch.device("cpu")
    autocast, scaler = amp_setup("auto", cpu)  # fp32 on a CPU
    with autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert scaler is None
    autocast, scaler = amp_setup("bf16", cpu)
    with autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert scaler is None
    with pytest.raises(ConfigError, match="run.amp=.fp16.: fp16 needs CUDA"):
        amp_setup("fp16", cpu)


def test_resolve_checkpoint_file_or_latest_of_a_folder(tmp_path):
    assert resolve_checkpoint(str(tmp_path)) is None and resolve_checkpoint("") is None
    with pytest.raises(FileNotFoundError, match="train one first"):
        resolve_checkpoint(str(tmp_path / "nothing"), "train one first")
    for name in ("ckpt_0000009.pt", "ckpt_0000010.pt", "ckpt_0000011.pt.tmp.7", "other_0000099.pt"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_0000010.pt")
    assert resolve_checkpoint(str(tmp_path / "ckpt_0000009.pt")) == str(tmp_path / "ckpt_0000009.pt")


def test_dino_head_prototypes_have_unit_norm():
    cfg = small_cfg()
    D = cfg.encoder.width
    head = DINOHead(D, cfg.head)
    with torch.no_grad():
        head.last_layer.weight.mul_(5.0)  # scaling the raw weight must not change the output
    x = torch.randn(4, D)
    out = head(x)
    assert out.shape == (4, cfg.head.num_prototypes)
    assert out.abs().max() <= 1.0 + 1e-5, "cosine between a unit bottleneck and unit prototypes"
    with torch.no_grad():
        head.last_layer.weight.mul_(0.1)
    assert torch.allclose(head(x), out, atol=1e-5)


def test_ema_update():
    s, t = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for p_t, p0, p_s in zip(t.parameters(), t0, s.parameters()):
        assert torch.allclose(p_t, 0.9 * p0 + 0.1 * p_s)
    ema_update(t, s, 1.0)  # momentum 1 freezes the teacher
    for p_t, p0, p_s in zip(t.parameters(), t0, s.parameters()):
        assert torch.allclose(p_t, 0.9 * p0 + 0.1 * p_s)


def test_latent_features_switch_routes_clip_through_bottleneck():
    cfg = small_cfg(latent_features=True)
    model = VTP(cfg).eval()
    assert model.visual_proj.weight.shape == (cfg.text.embed_dim, cfg.encoder.latent_dim)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.trunk.feature_bottleneck.weight.zero_()
    assert torch.allclose(model.image_features(x, normalize=False), torch.zeros(2, cfg.text.embed_dim))


# --- safetensors and checkpoints ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_round_trip(tmp_path, dtype):
    tensors = {"a": torch.randn(3, 5).to(dtype), "b.c": torch.randn(7).to(dtype), "s": torch.tensor(1.5).to(dtype),
               "i": torch.arange(6).reshape(2, 3)}
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["a"]["dtype"] == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert (8 + n) % 8 == 0
    back = load_safetensors(path)
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and back[k].shape == tensors[k].shape
        assert torch.equal(back[k], tensors[k])


def test_safetensors_reads_a_hand_written_file(tmp_path):
    # little-endian float32 [1.0, -2.0] and bf16 [0.5] written by hand
    data = (b"\x00\x00\x80\x3f" + b"\x00\x00\x00\xc0") + b"\x00\x3f"
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "y": {"dtype": "BF16", "shape": [1, 1], "data_offsets": [8, 10]}}).encode()
    (tmp_path / "h.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data)
    t = load_safetensors(tmp_path / "h.safetensors")
    assert t["x"].tolist() == [1.0, -2.0]
    assert t["y"].dtype == torch.bfloat16 and t["y"].item() == 0.5


def official_config(cfg):
    """The released config.json fields for a Config (as in MiniMaxAI/VTP-*-f16d64)."""
    e, d, t = cfg.encoder, cfg.decoder, cfg.text
    return {
        "model_type": "vtp", "image_size": e.image_size, "vision_patch_size": e.patch_size,
        "vision_embed_dim": e.width, "vision_depth": e.depth, "vision_num_heads": e.num_heads,
        "vision_mlp_ratio": 4.0, "vision_ffn_layer": "swiglu", "vision_norm_layer": "rmsnorm",
        "vision_use_qk_norm": False, "vision_feature_bottleneck": e.latent_dim, "vision_bottleneck_ae_only": True,
        "vision_clip_feat": "cls", "vision_init_values": None, "decoder_embed_dim": d.width,
        "decoder_depth": d.depth, "decoder_num_heads": d.num_heads, "decoder_ffn_layer": "swiglu",
        "decoder_norm_layer": "layernorm", "decoder_use_qk_norm": False, "decoder_init_values": None,
        "text_vocab_size": t.vocab_size, "text_context_length": t.context_length, "text_embed_dim": t.width,
        "text_depth": t.depth, "text_num_heads": t.num_heads, "text_mlp_ratio": 4.0, "text_pool_type": "argmax",
        "text_proj_type": "linear", "text_proj_bias": False, "text_quick_gelu": False, "text_pad_id": 0,
        "text_embed_cls": False, "text_no_causal_mask": False, "text_ls_init_value": None,
        "nonscalar_logit_scale": False, "init_logit_bias": None, "init_logit_scale": None,
    }


def write_official(model, cfg, folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official_config(cfg)))
    save_safetensors(model.state_dict(), folder / "model.safetensors")


def perturb_(model):
    """Random norms and biases, so a loader that drops them would be caught."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 and name != "logit_scale":
                p.add_(0.2 * torch.randn_like(p))


def test_official_layout_round_trip_reproduces_outputs(tmp_path):
    cfg = small_cfg()
    cfg.encoder.image_size = 64
    cfg.encoder.patch_size = 16
    cfg.encoder.width = cfg.decoder.width = 64
    cfg.encoder.num_heads = cfg.decoder.num_heads = 2
    cfg.encoder.latent_dim = 16
    cfg.text.embed_dim = 48  # differs from the width: the loader must read it from text_projection's shape
    model = VTP(cfg).eval()
    perturb_(model)
    write_official(model, cfg, tmp_path / "vtp")
    loaded = load_official_vtp(str(tmp_path / "vtp"))
    assert loaded.cfg.text.embed_dim == 48
    x = torch.randn(2, 3, 64, 64)
    tokens = torch.tensor([[cfg.text.vocab_size - 2, 5, 9, cfg.text.vocab_size - 1] + [0] * 28] * 2)
    with torch.no_grad():
        for fn in (model.encode, model.forward, model.image_features, lambda i: model.features(i)["patches"]):
            name = getattr(fn, "__name__", "features")
            other = getattr(loaded, name) if name != "<lambda>" else (lambda i: loaded.features(i)["patches"])
            assert torch.allclose(fn(x), other(x), atol=1e-6)
        assert torch.allclose(model.text_features(tokens), loaded.text_features(tokens), atol=1e-6)
    # load_vtp recognises the released folder too
    m2, cfg2, ckpt = load_vtp(str(tmp_path / "vtp"))
    assert ckpt == {} and cfg2.encoder.latent_dim == 16


def test_official_loader_errors(tmp_path):
    cfg = small_cfg()
    model = VTP(cfg)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_official_vtp(str(tmp_path))
    write_official(model, cfg, tmp_path / "bad")
    conf = json.loads((tmp_path / "bad" / "config.json").read_text())
    conf["text_quick_gelu"] = True
    (tmp_path / "bad" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="text_quick_gelu"):
        load_official_vtp(str(tmp_path / "bad"))
    conf["text_quick_gelu"] = False
    conf["vision_depth"] = 3  # the weights have 2 blocks
    (tmp_path / "bad" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="missing"):
        load_official_vtp(str(tmp_path / "bad"))


def test_own_checkpoint_round_trip(tmp_path):
    cfg = small_cfg()
    model = VTP(cfg).eval()
    perturb_(model)
    save_checkpoint(str(tmp_path / "ckpt_0000003.pt"), {"model": model.state_dict(), "config": cfg.to_dict()})
    save_checkpoint(str(tmp_path / "ckpt_0000001.pt"), {"model": VTP(cfg).state_dict(), "config": cfg.to_dict()})
    loaded, cfg2, ckpt = load_vtp(str(tmp_path))  # the folder: the latest step is picked
    assert cfg2 == cfg
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    with pytest.raises(FileNotFoundError, match="pretrain.py"):
        load_vtp(str(tmp_path / "nothing_here.pt"))
    assert not list(tmp_path.glob("*.tmp.*")), "atomic save leaves no temporary file"


# --- config and CLI ---

def test_runtime_knobs_live_in_the_run_section_only():
    """device / amp / compile / seed are one `run` section read by every stage, not a copy per stage (data.seed is
    the data set's own seed: which scenes exist, not how a run draws)."""
    import dataclasses
    cfg = Config()
    owners = {name: sorted(f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))
                           and name in {g.name for g in dataclasses.fields(getattr(cfg, f.name))})
              for name in ("device", "amp", "compile", "seed")}
    assert owners == {"device": ["run"], "amp": ["run"], "compile": ["run"], "seed": ["data", "run"]}
    with pytest.raises(ConfigError, match="unknown config key --dit.seed"):
        parse_config(["--dit.seed=1"])


def test_seeded_construction_depends_on_the_seed_alone_and_restores_the_global_generator():
    from model import seeded
    torch.manual_seed(5)
    expected = torch.rand(3)  # what the global stream gives next when nothing else draws
    torch.manual_seed(5)
    with seeded(1):
        a = nn.Linear(8, 8)
    torch.rand(7)  # a draw between two constructions must not change the second one
    with seeded(1):
        b = nn.Linear(8, 8)
    with seeded(2):
        c = nn.Linear(8, 8)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    torch.manual_seed(5)
    with seeded(1):
        nn.Linear(8, 8)
    assert torch.equal(torch.rand(3), expected)  # the global generator continues as if nothing had been drawn


def test_parse_config_types_and_nesting():
    cfg = parse_config(["--preset=S", "--encoder.depth=4", "--encoder.qk_norm", "--optim.lr=1e-3",
                        "--data.global_crop_scale=0.4,1.0", "--run.amp=bf16", "--text.tokenizer=x.gz"])
    assert cfg.preset == "S" and cfg.encoder.width == 384 and cfg.encoder.depth == 4
    assert cfg.encoder.qk_norm is True and cfg.optim.lr == 1e-3
    assert cfg.data.global_crop_scale == (0.4, 1.0) and cfg.run.amp == "bf16"
    assert parse_config([]).preset == "tiny"
    assert parse_config(["--tokenizer=a.pt"], aliases={"tokenizer": "dit.tokenizer"}).dit.tokenizer == "a.pt"


def test_config_dict_round_trip():
    cfg = parse_config(["--preset=B", "--data.mask_ratio=0.2,0.4"])
    back = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.data.mask_ratio, tuple)


@pytest.mark.parametrize("argv, match", [
    (["--encoder.nope=1"], "unknown config key --encoder.nope; valid keys: .*encoder.depth"),
    (["--nope.depth=1"], "unknown config key --nope.depth"),
    (["--encoder=3"], "unknown config key --encoder"),
    (["--encoder.depth=two"], "--encoder.depth=two: expected a value of type int"),
    (["--encoder.qk_norm=maybe"], "expected a value of type bool"),
    (["--optim.lr=fast"], "--optim.lr=fast: expected a value of type float"),
    (["--preset=XXL"], "preset='XXL': valid choices are tiny, S, B, L"),
    (["--run.amp=fp8"], "run.amp='fp8': valid choices are auto, bf16, fp16, fp32"),
    (["--encoder.rope_dtype=fp16"], "encoder.rope_dtype='fp16': valid choices are bf16, fp32"),
    (["--loss.teacher_norm=softmax"], "loss.teacher_norm='softmax': valid choices"),
    (["--data.dataset=coco"], "data.dataset='coco': valid choices"),
    (["--train.stage=3"], "train.stage=3: valid choices are 1, 2"),
    (["--encoder.image_size=30"], "encoder.image_size=30: must be a positive multiple of encoder.patch_size=4"),
    (["--encoder.num_heads=5"], "encoder.num_heads=5: must divide encoder.width=128"),
    (["--encoder.num_heads=64"], "head_dim = width/num_heads must be a multiple of 4"),
    (["--data.ssl_batch_size=100"], "data.ssl_batch_size=100: must be <= data.batch_size=64"),
    (["--data.color_jitter=0.4,0.4,0.2"], "data.color_jitter=.*must be four numbers"),
    (["--data.color_jitter=0.4,0.4,0.2,0.7"], "data.color_jitter=.*hue <= 0.5"),
    (["--data.grayscale_p=2"], "data.grayscale_p=2.0: must be in"),
    (["--encoder.drop_path_ssl=1.5"], "encoder.drop_path_ssl=1.5: must be in"),
    (["--loss.lambda_clip=-1"], "loss.lambda_clip=-1.0: must be >= 0"),
    (["--loss.lambda_clip=0", "--loss.lambda_ssl=0", "--loss.lambda_rec=0"], "at least one of"),
    (["--train.max_steps=0"], "train.max_steps=0: must be >= 1"),
    (["--dit.lr=-1e-3"], "dit.lr=-0.001: must be >= 0"),
    (["--dit.model=XXL"], "dit.model='XXL': valid choices are tiny, S, B, L, XL"),  # the keys of DiT_models
    (["--dit.ema_decay=1"], "dit.ema_decay=1.0: must be in"),
    (["--dit.grid_classes=0"], "dit.grid_classes=0: must be >= 1"),
    (["--eval.templates=fancy"], "eval.templates='fancy': valid choices are auto, clip, simple"),
    (["--eval.num_images=1"], "eval.num_images=1: must be >= 2"),
    (["--eval.probe_lrs=-1"], "eval.probe_lrs=.*must be learning rates >= 0"),
    (["--data.mask_ratio=0.5,0.1"], "data.mask_ratio=.*lo <= hi"),
    (["encoder.depth=3"], "unexpected argument 'encoder.depth=3'"),
])
def test_cli_errors_name_the_field(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_config_summary_prints_only_what_differs_from_the_preset():
    from model import config_summary
    assert config_summary(parse_config([])).splitlines() == ["config: preset tiny, unchanged (full config in "
                                                             "config.json)"]
    lines = config_summary(parse_config(["--preset=S", "--train.max_steps=10", "--loss.lambda_ssl=0"])).splitlines()
    assert lines[0].startswith("config: preset S, 2 value(s) changed")
    assert lines[1:] == ["  loss.lambda_ssl=0.0  (preset: 1.0)", "  train.max_steps=10  (preset: 100000)"]


def test_help_lists_every_key_with_its_preset_value_and_comment(capsys):
    from model import _all_keys, _get
    with pytest.raises(SystemExit) as e:
        parse_config(["--preset=S", "--help"], aliases={"tokenizer": "dit.tokenizer"})
    assert e.value.code == 0
    out = capsys.readouterr().out
    rows, cfg = out.splitlines()[2:], parse_config(["--preset=S"])
    assert len(rows) == len(_all_keys(cfg))
    for row, key in zip(rows, _all_keys(cfg)):
        assert (row + "  ").startswith(f"  --{key}={_get(cfg, key)}  "), row
    assert "--tokenizer = --dit.tokenizer" in out
    assert "--loss.lambda_rec=0.1  " in out and "weight of L_rec (paper and S/B/L: 0.1" in out  # the S preset's value
    assert re.search(r"--optim.text_lr_mult=1.0 +lr multiplier of the text tower", out)  # comment block above it
    assert "--encoder.width=384 " in out and "token width D" in out
    with pytest.raises(ConfigError, match="preset='X'"):  # a wrong preset is an error, with or without --help
        parse_config(["--preset=X", "--help"])
