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


def test_report_on_a_stage1_checkpoint(tmp_path, capsys):
    pretrain.main(SMALL + [f"--train.out_dir={tmp_path}", "--train.max_steps=1", "--data.builtin_val_size=32"])
    r = diag.report(str(tmp_path), n=16)
    assert r["images"] == 16 and r["log_k"] == pytest.approx(math.log(64))
    assert len(r["proto_energy"]) == len(r["z_energy"]) == 32  # --head.bottleneck_dim
    assert sum(r["proto_energy"]) == pytest.approx(1.0, abs=1e-4) and sum(r["z_energy"]) == pytest.approx(1.0, abs=1e-4)
    assert 0 < r["entropy"]["teacher"] < r["entropy"]["student"] <= math.log(64) + 1e-4  # colder is sharper
    diag.main([f"--ckpt={tmp_path}", "--images=8"])
    assert "log K = 4.159" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown or empty option .--image=8"):
        diag.main(["--image=8"])
    with pytest.raises(FileNotFoundError, match="pretrain.py"):
        diag.report(str(tmp_path / "none"))
