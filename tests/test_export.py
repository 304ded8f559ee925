"""Export to the released VTP format (config.json + model.safetensors) and back through load_official_vtp."""

import json
import os

import pytest
import torch

import pretrain
from model import (VTP, ConfigError, export_official, load_official_vtp, load_safetensors, load_vtp, official_config,
                   parse_config)
from test_pretrain import SMALL

# The released configs' keys and values (MiniMaxAI/VTP-{Small,Base,Large}-f16d64 config.json), written out.
RELEASED_COMMON = {
    "decoder_ffn_layer": "swiglu", "decoder_init_values": None, "decoder_norm_layer": "layernorm",
    "decoder_use_qk_norm": False, "image_size": 256, "init_logit_bias": None, "init_logit_scale": None,
    "model_type": "vtp", "nonscalar_logit_scale": False, "text_context_length": 77, "text_depth": 12,
    "text_embed_cls": False, "text_embed_dim": 768, "text_ls_init_value": None, "text_mlp_ratio": 4.0,
    "text_no_causal_mask": False, "text_num_heads": 12, "text_output_tokens": False, "text_pad_id": 0,
    "text_pool_type": "argmax", "text_proj_bias": False, "text_proj_type": "linear", "text_quick_gelu": False,
    "text_vocab_size": 49408, "train_clip": True, "train_reconstruction": True, "vision_bottleneck_ae_only": True,
    "vision_clip_feat": "cls", "vision_feature_bottleneck": 64, "vision_ffn_layer": "swiglu",
    "vision_init_values": None, "vision_mlp_ratio": 4.0, "vision_norm_layer": "rmsnorm", "vision_patch_size": 16,
    "vision_use_qk_norm": False}
RELEASED_SIZES = {
    "S": dict(decoder_depth=12, decoder_embed_dim=384, decoder_num_heads=6, vision_depth=12, vision_embed_dim=384,
              vision_num_heads=6),
    "B": dict(decoder_depth=12, decoder_embed_dim=768, decoder_num_heads=12, vision_depth=12, vision_embed_dim=768,
              vision_num_heads=12),
    "L": dict(decoder_depth=24, decoder_embed_dim=1024, decoder_num_heads=16, vision_depth=24,
              vision_embed_dim=1024, vision_num_heads=16)}
RELEASED_TENSORS = {"S": 477, "B": 477, "L": 789}  # tensors in each released model.safetensors


@pytest.mark.parametrize("size", ["S", "B", "L"])
def test_config_of_released_sizes_is_the_released_config(size):
    cfg = parse_config([f"--preset={size}"])
    assert official_config(cfg) == {**RELEASED_COMMON, **RELEASED_SIZES[size]}
    with torch.device("meta"):
        model = VTP(cfg)
    assert len(model.state_dict()) == RELEASED_TENSORS[size]


def model_cfg():
    return parse_config(SMALL)


def outputs(model, x, tokens):
    with torch.no_grad():
        f = model.features(x)
        return {"latents": model.encode(x), "recon": model(x), "image": model.image_features(x),
                "text": model.text_features(tokens), "cls": f["cls"], "patches": f["patches"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few stage-1 steps with --train.export: (trained VTP, export folder, tokenizer state)."""
    tmp = tmp_path_factory.mktemp("export")
    export = str(tmp / "exported")
    student = pretrain.main(SMALL + [f"--train.out_dir={tmp / 'run'}", "--train.max_steps=3",
                                     f"--train.export={export}"])
    ckpt = torch.load(os.path.join(tmp / "run", "ckpt_0000003.pt"), weights_only=True)
    return student.vtp.eval(), export, ckpt["tokenizer"], tmp


def test_stage2_exports_the_fine_tuned_decoder(trained):
    _, _, _, tmp = trained
    export = str(tmp / "exported2")
    vtp = pretrain.main(SMALL + [f"--train.out_dir={tmp / 'run'}", "--train.stage=2", "--train.max_steps=2",
                                 f"--train.export={export}"])
    loaded = load_official_vtp(export)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vtp.decode(z), loaded.decode(z))


def test_round_trip_fp32_is_exact(trained):
    model, folder, tok, _ = trained
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "text_tokenizer.json"]
    loaded = load_official_vtp(folder)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 298, (2, 24), generator=torch.Generator().manual_seed(1))
    tokens[:, -1] = 299
    want, got = outputs(model, x, tokens), outputs(loaded, x, tokens)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # the run's own BPE travels with the weights and comes back through load_vtp
    _, _, extra = load_vtp(folder)
    assert extra["tokenizer"] == tok


def test_round_trip_bf16_within_bf16_tolerance(trained, tmp_path):
    model, _, _, _ = trained
    export_official(model, model_cfg(), str(tmp_path), dtype="bf16")  # the run's architecture
    st = load_safetensors(str(tmp_path / "model.safetensors"))
    assert st["trunk.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert st["trunk.rope_embed.periods"].dtype == torch.bfloat16  # as released
    loaded = load_official_vtp(str(tmp_path))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 298, (2, 24), generator=torch.Generator().manual_seed(1))
    tokens[:, -1] = 299
    want, got = outputs(model, x, tokens), outputs(loaded, x, tokens)
    for k in want:
        err = (want[k] - got[k]).norm() / want[k].norm()
        assert 0 < err < 3e-2, (k, err)  # rounded (not identical), but close


def test_fp32_file_keeps_fp32_weights_and_bf16_periods(trained):
    _, folder, _, _ = trained
    st = load_safetensors(os.path.join(folder, "model.safetensors"))
    assert st["trunk.blocks.0.attn.qkv.weight"].dtype == torch.float32
    assert st["pixel_decoder.rope_embed.periods"].dtype == torch.bfloat16
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    assert hf["vision_embed_dim"] == 64 and hf["text_vocab_size"] == 300 and hf["image_size"] == 32


@pytest.mark.parametrize("option", ["--encoder.qk_norm=true", "--encoder.latent_features=true",
                                    "--encoder.rope_dtype=fp32", "--encoder.mlp_hidden=96", "--text.embed_dim=32"])
def test_unexportable_option_fails_before_writing(tmp_path, option):
    out, export = tmp_path / "run", tmp_path / "exported"
    with pytest.raises(ConfigError, match=option.split("=")[0].lstrip("-")):
        pretrain.main(SMALL + [option, f"--train.out_dir={out}", f"--train.export={export}"])
    assert not export.exists() and not out.exists()  # nothing trained, nothing written
    cfg = parse_config(SMALL + [option])
    with pytest.raises(ConfigError):
        export_official(VTP(cfg), cfg, str(export))
    assert not export.exists()
