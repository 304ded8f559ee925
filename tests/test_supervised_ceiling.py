"""scripts/supervised_ceiling.py: the supervised yardstick of the linear probe is deterministic and scores true labels."""

import os
import sys

import pytest
import torch

import data
from model import Config, ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import supervised_ceiling as ceiling  # noqa: E402

TINY = ["--steps=4", "--batch=8", "--val=16", "--encoder.depth=1", "--decoder.depth=1", "--text.depth=1"]


def test_batches_carry_each_scenes_own_shape_label():
    ds = data.build_dataset(Config(), "val")
    x, y = ceiling.labelled_batch(ds, [5, 0, 9], 32)
    assert x.shape == (3, 3, 32, 32)
    assert y.tolist() == [ds[i]["label"] for i in (5, 0, 9)]
    assert torch.allclose(x[1], data.normalize(data.to_tensor(data.adm_center_crop(ds[0]["image"], 32))), atol=1e-5)


def test_same_seed_same_curve_other_seed_other_curve():
    a, b = ceiling.main(TINY), ceiling.main(TINY)
    assert a == b and [r["step"] for r in a] == [1, 2, 3, 4]
    assert ceiling.main(TINY + ["--run.seed=1"]) != a


def test_a_wrong_config_flag_fails_naming_it():
    with pytest.raises(ConfigError, match="encoder.depht"):
        ceiling.main(TINY + ["--encoder.depht=2"])
