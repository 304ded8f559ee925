"""scripts/ssl_head_diagnostic.py: direction energies and entropies on hand-worked inputs, and a report that reads a
real stage-1 checkpoint's teacher."""

import math
import os
import sys

import pytest
import torch

import pretrain
from model import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import ssl_head_diagnostic as diag  # noqa: E402
from test_pretrain import SMALL  # noqa: E402


def test_direction_energy_finds_outputs_hiding_from_the_prototypes():
    # four prototypes in the xy-plane of a 3-d bottleneck: the z-axis holds none of their energy
    w = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 2, 0], [0, -1, 0]])
    proto, z = diag.direction_energy(torch.tensor([[0.0, 0, 1], [0, 0, -3]]), w)
    assert torch.allclose(proto, torch.tensor([0.5, 0.5, 0.0]), atol=1e-6)
    assert torch.allclose(z, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # all of it in the empty direction
    _, z = diag.direction_energy(torch.tensor([[1.0, 1, 0]]), w)
    assert z[2].item() == pytest.approx(0.0, abs=1e-6) and z.sum().item() == pytest.approx(1.0)


def test_direction_energy_with_fewer_prototypes_than_dimensions():
    proto, z = diag.direction_energy(torch.tensor([[0.6, 0.8, 0]]), torch.tensor([[0.0, 5, 0]]))
    assert torch.allclose(proto, torch.tensor([1.0, 0.0, 0.0]))
    assert z[0].item() == pytest.approx(0.64, abs=1e-6) and z.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_entropy_uniform_and_one_hot():
    assert diag.entropy(torch.zeros(3, 16), 0.1) == pytest.approx(math.log(16), abs=1e-5)
    assert diag.entropy(torch.eye(16)[:4], 0.001) == pytest.approx(0.0, abs=1e-5)


def test_target_stats_tell_spread_from_collapse():
    # every scene on its own prototype: sharp targets, an even mean over 4 of K = 8
    logits = torch.eye(8)[:4]
    row, marginal, used = diag.target_stats(logits, torch.zeros(8), 0.001)
    assert row == pytest.approx(0.0, abs=1e-5) and marginal == pytest.approx(math.log(4)) and used == 4
    # all scenes on prototype 0: sharp and collapsed
    row, marginal, used = diag.target_stats(torch.eye(8)[[0, 0, 0]], torch.zeros(8), 0.001)
    assert row == pytest.approx(0.0, abs=1e-5) and marginal == pytest.approx(0.0, abs=1e-5) and used == 1
    # the centre is subtracted before the softmax: a centre that cancels the logits leaves the targets uniform
    row, marginal, _ = diag.target_stats(torch.eye(8)[[2, 2]], torch.eye(8)[2], 0.001)
    assert row == pytest.approx(math.log(8)) and marginal == pytest.approx(math.log(8))


def test_report_on_a_stage1_checkpoint(tmp_path, capsys):
    pretrain.main(SMALL + [f"--train.out_dir={tmp_path}", "--train.max_steps=1", "--data.builtin_val_size=32"])
    r = diag.report(str(tmp_path), n=16)
    assert r["images"] == 16 and r["log_k"] == pytest.approx(math.log(64))
    assert len(r["proto_energy"]) == len(r["z_energy"]) == 32  # --head.bottleneck_dim
    assert sum(r["proto_energy"]) == pytest.approx(1.0, abs=1e-4) and sum(r["z_energy"]) == pytest.approx(1.0, abs=1e-4)
    assert 0 < r["entropy"]["teacher"] < r["entropy"]["student"] <= math.log(64) + 1e-4  # colder is sharper
    # the tiny default centres the teacher: the report reads the checkpoint's centre
    c = r["centred_targets"]
    assert 0 < c["entropy"] <= c["marginal_entropy"] + 1e-4 <= math.log(64) + 2e-4 and 1 <= c["prototypes_used"] <= 16
    diag.main([f"--ckpt={tmp_path}", "--images=8"])
    out = capsys.readouterr().out
    assert "log K = 4.159" in out and "centred teacher targets" in out
    pretrain.main(SMALL + [f"--train.out_dir={tmp_path / 'sk'}", "--train.max_steps=1", "--data.builtin_val_size=32",
                           "--loss.teacher_norm=sinkhorn"])
    assert diag.report(str(tmp_path / "sk"), n=16)["centred_targets"] is None
    with pytest.raises(ConfigError, match="unknown or empty option .--image=8"):
        diag.main(["--image=8"])
    with pytest.raises(FileNotFoundError, match="pretrain.py"):
        diag.report(str(tmp_path / "none"))
