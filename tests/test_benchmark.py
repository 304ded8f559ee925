"""scripts/benchmark.py: the written-out stage-1 FLOP count agrees with torch's counter, every step runs, and the
memory model counts what a step allocates (hand-worked sizes, the autograd graph, real tensors vs fake ones)."""

import contextlib
import io
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import VTP, parse_config
from pretrain import Student, Teacher

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import benchmark  # noqa: E402

SMALL = ["--encoder.depth=1", "--decoder.depth=1", "--text.depth=1", "--data.batch_size=8",
         "--data.ssl_batch_size=4", "--data.rec_batch_size=4", "--data.num_local_crops=2"]
ARGS = benchmark.step_args(batch=4, dit_model="tiny", sample_steps=2)
GiB = 2 ** 30


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


def test_synthetic_batch_fills_the_padded_masks():
    """The synthetic iBOT masks fill the loader's M_max slots: int(2 B_ssl mask_prob) crops, int(ratio N) patches."""
    cfg = parse_config(SMALL)
    batch = benchmark.synthetic_batch(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    n = (cfg.encoder.image_size // cfg.encoder.patch_size) ** 2
    n_crops, cap = int(2 * 4 * cfg.data.mask_prob), int(cfg.data.mask_ratio[1] * n)
    assert batch["mask_indices"].shape == batch["mask_weight"].shape == (n_crops * cap,)
    assert torch.equal(batch["mask_indices"], batch["masks"].flatten().nonzero().flatten())
    assert batch["mask_weight"].sum().item() == pytest.approx(n_crops)


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
    args = benchmark.step_args(**{**vars(ARGS), "real_data": True})
    step, _, _, student = benchmark.build_stage1(cfg, args, torch.device("cpu"))
    w0 = student.vtp.trunk.blocks[0].attn.qkv.weight.detach().clone()
    step()
    step()
    assert len(step.waits) == 2 and all(w > 0 for w in step.waits)
    assert not torch.equal(w0, student.vtp.trunk.blocks[0].attn.qkv.weight)


# -----------------------------------------------------------------------------
# The memory model


def test_memory_counter_counts_storages_once_and_frees_them():
    """Hand-worked: sizes rounded up to 512-byte blocks, views and in-place results free, frees tracked, peak kept."""
    with benchmark.MemoryCounter() as c:
        a = torch.empty(1000)  # 4000 bytes -> 4096
        view = a.view(10, 100)
        a.add_(1)
        assert c.live == 4096
        b = a * 2
        assert c.live == c.peak == 8192
        del a
        assert c.live == 8192  # the view keeps the storage
        del view
        assert c.live == 4096
        small = torch.empty(3)  # 12 bytes -> one 512-byte block
        assert c.live == 4096 + 512 and c.peak == 8192 and c.largest[0] == 4096
        del b, small
        assert c.live == 0


def test_memory_counter_sees_the_backward():
    """After a backward and the graph's release only the gradient is left; the peak held activations and grads."""
    w = torch.randn(256, 256, requires_grad=True)  # made before counting: not counted
    with benchmark.MemoryCounter() as c:
        x = torch.randn(64, 256)
        y = (x @ w).relu()  # the mm output (64, 256) dies once relu has made its own (saved for the backward)
        assert c.live == 2 * 64 * 256 * 4 and c.peak == 3 * 64 * 256 * 4
        y.sum().backward()
        del x, y
        assert c.live == 256 * 256 * 4  # w.grad
        assert c.peak >= 2 * 64 * 256 * 4 + 256 * 256 * 4


def test_cuda_autocast_ops_run_in_fp32_like_cuda():
    """Within cuda_autocast_ops a CPU bf16 autocast runs LayerNorm / softmax / norm in fp32 (CUDA's policy), and
    only there: the kernels are gone afterwards."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with benchmark.cuda_autocast_ops(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.float32
        assert x.softmax(-1).dtype == torch.float32 and x.sum().dtype == torch.float32
        assert F.normalize(x, dim=-1).dtype == torch.float32
        assert F.linear(x.float(), torch.randn(3, 8)).dtype == torch.bfloat16  # lower precision as before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16


def saved_in_graph(loss, exclude):
    """Bytes of the distinct storages the autograd graph of `loss` holds (every node's _saved_* tensors, custom
    Functions' saved_tensors), read from the graph itself: an independent count of what SavedCounter sees. On fake
    tensors the Python numbers autograd wraps as 0-d tensors stay real ones: host memory, left out (as by the hooks)."""
    seen, storages, stack = set(), {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = [getattr(node, n) for n in dir(node) if n.startswith("_saved_")]
        values += list(getattr(node, "saved_tensors", ()))
        for v in values:
            for t in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(t, FakeTensor) and id(t.untyped_storage()) not in exclude:
                    storages[id(t.untyped_storage())] = benchmark.cuda_bytes(t.untyped_storage())
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # Teacher's deepcopy
def test_saved_counter_matches_hand_and_graph():
    """A Linear under bf16 autocast saves its input and weight as bf16 copies (hand-worked); on a whole stage-1
    forward (fake tensors) the hooks count exactly what the autograd graph holds."""
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    with benchmark.SavedCounter(exclude={id(x.untyped_storage())}) as saved, torch.autocast("cpu", torch.bfloat16):
        lin(x)
    assert saved.bytes == 16 * 64 * 2 + 32 * 64 * 2  # bf16 x (for W's gradient) and W (for x's); the bias none
    with benchmark.SavedCounter() as saved, torch.autocast("cpu", torch.bfloat16):
        lin(x.detach())
    assert saved.bytes == 16 * 64 * 2  # an input without grad: W is not needed

    cfg = parse_config(SMALL + ["--loss.lpips=on"])
    args, cpu = benchmark.step_args(meta_init=True, lpips=True), torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True), contextlib.redirect_stdout(io.StringIO()):
        benchmark.lpips_without_files(cfg, args)
        student = benchmark.build(lambda: Student(cfg), cpu, args)
        benchmark.random_lpips(student.rec_loss, cpu, args)
        teacher = benchmark.place(Teacher(student), cpu, args)
        batch = benchmark.synthetic_batch(cfg, cpu, torch.Generator().manual_seed(0))
        exclude = {id(t.untyped_storage()) for t in [*student.parameters(), *student.buffers(), *batch.values()]}
        with benchmark.SavedCounter(exclude) as saved, benchmark.cuda_autocast_ops(), \
                torch.autocast("cpu", torch.bfloat16):
            probs = teacher(batch["global_crops"], batch["mask_indices"], 0.07, batch["mask_weight"])
            terms, _ = student(batch, probs)
        assert saved.bytes > 0 and saved.bytes == saved_in_graph(terms["total"], exclude)


def test_fake_tensors_count_what_real_ones_allocate():
    """The same stage-1 and stage-2 steps on real CPU tensors and on fake ones: identical peaks and parts."""
    cfg = parse_config(SMALL + ["--loss.lpips=on"])  # LPIPS with random weights, as S/B/L count it
    for stage in (1, 2):
        real, fake = (benchmark.count_step(cfg, stage, fake=f) for f in (False, True))
        assert {k: real[k] for k in ("peak", "resident", "saved", "largest")} == \
            {k: fake[k] for k in ("peak", "resident", "saved", "largest")}
        assert fake["peak"] > fake["resident"] + fake["saved"] / 2


def test_saved_activations_grow_linearly_with_the_batch():
    """Activations are per sample (CLIP's B x B logits aside): equal steps in the batch add equal bytes."""
    cfg = parse_config(SMALL)
    counts = [benchmark.count_step(benchmark.with_batch(cfg, 1, u), 1) for u in (2, 4, 6)]
    for key in ("saved", "peak"):
        s0, s1, s2 = (c[key] for c in counts)
        assert s2 - s1 == pytest.approx(s1 - s0, rel=0.02) and s1 - s0 > 0


def test_grad_checkpoint_lowers_the_count():
    """train.grad_checkpoint: both stages save and peak less, and each more decoder block saves exactly its input,
    the (B, N, D) bf16 residual stream (hand-worked), where without checkpointing it saves 28 times more."""
    off, on = (benchmark.count_step(parse_config(SMALL + ["--encoder.depth=4", "--decoder.depth=4", "--text.depth=4",
                                                         f"--train.grad_checkpoint={ckpt}"]), 1) for ckpt in (False, True))
    assert on["saved"] < 0.8 * off["saved"] and on["peak"] < off["peak"], (off, on)

    def saved_per_block(ckpt):  # stage 2: the decoder alone trains
        saved = []
        for depth in (2, 4):
            c = parse_config(SMALL + [f"--decoder.depth={depth}", f"--train.grad_checkpoint={ckpt}"])
            saved.append(benchmark.count_step(c, 2)["saved"])
        return (saved[1] - saved[0]) / 2

    B, N, D = 8, (32 // 4) ** 2, 128  # stage-2 batch (data.batch_size), tokens, decoder width
    assert saved_per_block(True) == B * N * D * 2
    assert saved_per_block(False) > 20 * B * N * D * 2


def test_ddp_buckets_add_the_trainable_gradients():
    """DDP's buckets hold every trainable gradient for good: the resident bytes grow by (about) their size."""
    cfg = parse_config(SMALL)
    one, ddp = (benchmark.count_step(cfg, 2, ddp=d) for d in (False, True))
    with torch.device("meta"):
        decoder = VTP(cfg).pixel_decoder
    grads = 4 * sum(p.numel() for p in decoder.parameters())
    assert ddp["resident"] - one["resident"] == pytest.approx(grads, abs=benchmark.CUDA_BLOCK)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("preset", benchmark.MEMORY_PRESETS)
def test_shipped_batches_fit_80gb(preset, stage):
    """Every per-GPU batch S/B/L ship (stage 1 at data.batch_size / ssl / rec, stage 2 at train.stage2_batch_size),
    with the preset's grad_checkpoint and DDP's buckets, counts below 72 GiB: an 80 GiB card with headroom."""
    cfg = parse_config([f"--preset={preset}"])
    peak = benchmark.count_step(cfg, stage, ddp=True)["peak"]
    assert peak < 72 * GiB, (f"{preset} stage {stage} at per-GPU batch {benchmark.shipped_batch(cfg, stage)}, "
                             f"grad_checkpoint {cfg.train.grad_checkpoint}: {peak / GiB:.1f} GiB counted "
                             "(python scripts/benchmark.py --memory)")


def test_compile_time_is_reported(capsys):
    """--compile (regional, model.compile_blocks; the eager backend keeps it fast) prints the compile time."""
    torch._dynamo.reset()  # no compiled code from other tests, none left for them
    try:
        benchmark.main(["--compile", "--run.compile_backend=eager", "--steps=1", "--warmup=1"] + SMALL)
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "compile time" in out and "graphs compiled" in out


def test_memory_cli_prints_the_table(capsys):
    benchmark.main(["--memory", "--preset=tiny", "--no_search", "--run.device=cpu"] + SMALL)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith("tiny |")]
    assert len(rows) == 4  # stage 1 and 2, grad checkpointing off and on


def test_the_paper_batch_table_accumulates_micro_batches_of_the_shipped_size():
    # 128 GPUs x 128 pairs: the tiny preset's shipped batch is 64, so two micro-steps of 64 / 16 / 8
    (row,) = benchmark.paper_batch_rows(["tiny"], gpus=(128,))
    assert (row["per_gpu"], row["micro"], row["accum_steps"]) == (128, 64, 2)
    assert row["peak_ddp"] > 0
