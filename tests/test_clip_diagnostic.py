"""scripts/clip_shape_diagnostic.py: its report measures what it says, and a frozen text tower stays frozen."""

import os
import sys

import pytest
import torch

from model import VTP, Config, ConfigError
from pretrain import TEXT_TOWER

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import clip_shape_diagnostic as diag  # noqa: E402


def test_options_are_typed_and_unknown_ones_fail():
    o = diag.parse(["--steps=3", "--text_lr_mult=0.5"])
    assert o["steps"] == 3 and o["text_lr_mult"] == 0.5 and o["batch"] == diag.OPTIONS["batch"]
    with pytest.raises(ConfigError, match="--steps"):
        diag.parse(["--step=3"])


class _Stub:
    """Image features = one-hot of the shape (or constant); text features = one-hot of the shape word's row."""

    def __init__(self, image_knows_shape, text_knows_shape):
        self.image, self.text = image_knows_shape, text_knows_shape

    def image_features(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 8).float() if self.image else torch.ones(len(x), 8) / 8 ** 0.5

    def text_features(self, t):
        return torch.nn.functional.one_hot(t[:, 0], 8).float() if self.text else torch.ones(len(t), 8) / 8 ** 0.5


def test_report_reads_shape_knowledge_off_the_features():
    y = torch.arange(64) % 8
    x = y.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    t, prompts = y.view(-1, 1), torch.arange(8).view(-1, 1)
    good = diag.report(_Stub(True, True), prompts, (x, y), x, t, y)
    assert good == "zs 1.000 knn 1.000 tacc 1.000 pcos 0.00"
    blind = diag.report(_Stub(True, False), prompts, (x, y), x, t, y)
    assert "knn 1.000" in blind and "pcos 1.00" in blind and "tacc 0.125" in blind


def test_a_few_steps_run_and_the_text_tower_can_be_frozen(capsys, monkeypatch):
    made = []
    monkeypatch.setattr(diag, "VTP", lambda cfg: made.append(VTP(cfg)) or made[-1])
    diag.main(["--steps=2", "--scenes=64", "--val=16", "--knn_train=32", "--every=1", "--batch=8",
               "--text_lr_mult=0"])
    out = capsys.readouterr().out
    assert out.count("step ") == 3 and "zs " in out
    torch.manual_seed(0)
    fresh = VTP(Config())
    after = dict(made[0].named_parameters())
    text = [n for n, _ in fresh.named_parameters() if n.split(".")[0] in TEXT_TOWER]
    assert len(text) > 5 and all(torch.equal(dict(fresh.named_parameters())[n], after[n]) for n in text)
    for n in ("trunk.blocks.0.attn.qkv.weight", "visual_proj.weight", "logit_scale"):  # the image side trains
        assert not torch.equal(dict(fresh.named_parameters())[n], after[n]), n
