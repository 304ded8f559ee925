"""scripts/benchmark.py: the written-out stage-1 FLOP count agrees with torch's counter, and every step runs."""

import argparse
import os
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import parse_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import benchmark  # noqa: E402

SMALL = ["--encoder.depth=1", "--decoder.depth=1", "--text.depth=1", "--data.batch_size=8",
         "--data.ssl_batch_size=4", "--data.rec_batch_size=4", "--data.num_local_crops=2"]
ARGS = argparse.Namespace(compile=False, lpips=False, batch=4, dit_model="tiny", sample_steps=2, real_data=False)


@pytest.mark.parametrize("extra", [[], ["--loss.lambda_clip=0"], ["--loss.lambda_ssl=0", "--loss.lambda_clip=0"],
                                   ["--loss.lambda_rec=0"], ["--encoder.latent_features=true"],
                                   ["--encoder.depth=2", "--head.nlayers=2", "--decoder.width=64"]])
def test_stage1_flops_written_out_match_the_counter(extra):
    """Every matmul of a stage-1 step (the math attention kernel, which the counter sees on CPU) is in
    stage1_flops: the totals agree to 0.1% (KoLeo's no-grad similarity matrix is the one thing left out)."""
    cfg = parse_config(SMALL + extra)
    step, _, parts, _ = benchmark.build_stage1(cfg, ARGS, torch.device("cpu"))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    assert sum(parts.values()) == pytest.approx(counter.get_total_flops(), rel=1e-3)
    assert all(v > 0 for v in parts.values())


def test_stage1_flops_parts_follow_the_lambdas():
    ae = benchmark.stage1_flops(parse_config(["--loss.lambda_clip=0", "--loss.lambda_ssl=0"]), 0)
    assert set(ae) == {"encoder rec", "pixel decoder"}
    full = benchmark.stage1_flops(parse_config([]), 10)
    assert {"text tower", "encoder SSL (teacher)", "DINO head (student)"} <= set(full)
    # more masked tokens -> more head FLOPs, nothing else changes
    more = benchmark.stage1_flops(parse_config([]), 20)
    assert more["DINO head (teacher)"] > full["DINO head (teacher)"]
    assert more["encoder CLIP"] == full["encoder CLIP"]


@pytest.mark.parametrize("what", ["stage2", "dit", "sample", "fid"])
def test_other_steps_run(what):
    cfg = parse_config(SMALL)
    step, n_img, _, module = benchmark.BUILDERS[what](cfg, ARGS, torch.device("cpu"))
    before = [p.detach().clone() for p in module.parameters()]
    step()
    assert n_img == 4
    changed = any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert changed == (what in ("stage2", "dit"))  # training steps update the module, the others do not


def test_stage1_on_real_batches_times_the_loader():
    cfg = parse_config(SMALL)
    args = argparse.Namespace(**{**vars(ARGS), "real_data": True})
    step, _, _, student = benchmark.build_stage1(cfg, args, torch.device("cpu"))
    w0 = student.vtp.trunk.blocks[0].attn.qkv.weight.detach().clone()
    step()
    step()
    assert len(step.waits) == 2 and all(w > 0 for w in step.waits)
    assert not torch.equal(w0, student.vtp.trunk.blocks[0].attn.qkv.weight)
