"""
The paper's two findings in miniature, on the built-in data (the README's "Reproducing the paper's findings in
miniature"): the loss ablation (the paper's Figure 2: understanding drives generation) and tokenizer scaling (its
Figure 1: VTP keeps improving with stage-1 compute, a reconstruction-only AE does not).

    python scripts/ablation.py                   # AE, CLIP+AE, SSL+AE, CLIP+SSL+AE at equal stage-1 steps
    python scripts/ablation.py --scaling         # AE and CLIP+SSL+AE at 1x, 3x, 9x the stage-1 steps
    python scripts/ablation.py --quick           # a few steps of everything (the test runs this)
    python scripts/ablation.py --report --out=scripts/results/ablation   # redraw results.md and plots, run nothing

The loss ablation also measures how fast the DiT converges on each tokenizer (the paper's "x times faster"):
gFD_judge of the same DiT after 1/8, 1/4, 1/2 and all of its steps, with and without guidance, and the DiT steps each
tokenizer needs to reach the AE's final gFD_judge. A second DiT seed on the CLIP+SSL+AE tokenizer measures how much
the DiT's own seed moves gFD_judge, the yardstick for every difference in the tables.

Options: --out=runs/ablation (or runs/scaling), --steps=N stage-1 steps of the 1x budget (default: the preset's),
--dit_steps=N (default: the DiT preset's), --num_gen=N samples per guidance scale (default 256), --gen_steps=N Euler
steps (default 50); any other --key=value goes to every pretrain.py call (e.g. --data.batch_size=64).

Every tokenizer gets the same data, seed and number of steps; every DiT the same architecture, steps and seed; every
evaluation the same images and the same fixed judge (evaluate.py judge). Nothing is tuned per variant. Each unit of
work (a pre-training, its evaluation, a DiT, its samples) leaves a file when done and is skipped when that file
exists; a killed study re-run with the same command continues where it stopped (pretrain.py and train_dit.py resume
from their last checkpoints).
"""

import contextlib
import gc
import importlib
import json
import math
import os
import sys
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import benchmark  # noqa: E402  (written-out stage-1 FLOPs)
from model import PRESETS, ConfigError, parse_config, resolve_checkpoint, run_cli  # noqa: E402

# The paper's ablation: which objectives are on (lambda_rec at the preset's value always).
VARIANTS = {"AE": ["--loss.lambda_clip=0", "--loss.lambda_ssl=0"], "CLIP+AE": ["--loss.lambda_ssl=0"],
            "SSL+AE": ["--loss.lambda_clip=0"], "CLIP+SSL+AE": []}
SCALING_VARIANTS = ("AE", "CLIP+SSL+AE")
SCALING_BUDGETS = (1, 3, 9)
GUIDANCE = (1.0, 4.0)  # judge accuracy and gFD_judge without and with classifier-free guidance
CONVERGENCE = (1 / 8, 1 / 4, 1 / 2, 1)  # loss ablation: the DiT is evaluated at these fractions of its steps
VARIANCE_SEEDS = (1,)  # loss ablation: more DiT seeds (--run.seed) on the CLIP+SSL+AE tokenizer
QUICK = {"steps": 4, "dit_steps": 4, "num_gen": 16, "gen_steps": 2, "eval_images": 32, "judge_images": 256}
COLORS = {"AE": (200, 60, 40), "CLIP+AE": (40, 120, 200), "SSL+AE": (40, 160, 80), "CLIP+SSL+AE": (120, 50, 170),
          "CLIP+SSL+AE, DiT seed 1": (170, 130, 220)}
UNIT_PATH_KEYS = ("train.out_dir", "train.max_steps", "train.ckpt_every")  # what a unit sets besides its flags


def run(cmd, log):
    """
    Run one stage, `python <script> <flags>` (cmd = [script, *flags]), as that command would: the script's main() with
    the same flags, here in this process (a new Python per stage would import torch ~30 times in a study), its output
    appended to `log`. Every stage draws only from its own seeded generators, so nothing carries over from the stage
    before. A failing stage stops the study with its own error; re-running the study resumes it.
    """
    stage = importlib.import_module(os.path.splitext(cmd[0])[0])
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"\n$ python {' '.join(cmd)}", flush=True)
        try:
            stage.main(cmd[1:])
        except Exception as e:
            print(f"error: {type(e).__name__}: {e}", flush=True)
            raise
    gc.collect()  # the stage's models and caches are garbage now: free them before the next one


def evaluate(command, out_json, flags, log):
    """evaluate.py `command` -> its results dict, cached in out_json."""
    if not os.path.isfile(out_json):
        run(["evaluate.py", command, f"--eval.out={out_json}"] + flags, log)
    with open(out_json) as f:
        return json.load(f)[command]


def unit_flags(folder, flags, steps):
    """The pretrain.py flags of one unit: its folder, steps and checkpoint interval, then the study's flags."""
    return [f"--train.out_dir={folder}", f"--train.max_steps={steps}", f"--train.ckpt_every={max(1, steps // 4)}"] + flags


def pretrain(folder, flags, steps, log):
    """Stage 1 into `folder` for `steps` steps (resumed if a checkpoint is there); returns the final checkpoint."""
    final = os.path.join(folder, f"ckpt_{steps:07d}.pt")
    if not os.path.isfile(final):
        resume = ["--train.resume=true"] if resolve_checkpoint(folder) else []
        run(["pretrain.py"] + unit_flags(folder, flags, steps) + resume, log)
    if not os.path.isfile(final):
        raise RuntimeError(f"pretrain.py finished without writing {final}; see {log}")
    return final


def tokenizer_flops(flags, steps):
    """Stage-1 training FLOPs (forward + backward, written out part by part in benchmark.stage1_flops) of `steps`
    steps, with the expected number of iBOT-masked patches per step."""
    cfg = parse_config(flags)
    d, e = cfg.data, cfg.encoder
    n_patches = (e.image_size // e.patch_size) ** 2
    n_masked = round(2 * d.ssl_batch_size * d.mask_prob * sum(d.mask_ratio) / 2 * n_patches)
    return steps * sum(benchmark.stage1_flops(cfg, n_masked).values())


def study_unit(name, folder, flags, steps, o, log):
    """One tokenizer end to end: pre-train, evaluate, DiT on its latents, evaluate the samples (a `timed` row)."""
    return timed(folder, log, lambda: _study_unit(name, folder, flags, steps, o, log))


def timed(folder, log, work):
    """
    work()'s row with `seconds`: the wall time spent on it, summed over every run of the study that did some of it
    (kept in `folder/seconds.json`, so a resumed study still reports the whole cost; None for work finished before
    the file existed). Work that only read cached results adds nothing.
    """
    os.makedirs(folder, exist_ok=True)
    t0, n_log = time.time(), _log_size(log)
    row = work()
    timing = os.path.join(folder, "seconds.json")
    seconds = json.load(open(timing))["seconds"] if os.path.isfile(timing) else None
    if _log_size(log) > n_log:  # this call ran some of the stages (each one appends to the log)
        seconds = (seconds or 0.0) + time.time() - t0
        with open(timing, "w") as f:
            json.dump({"seconds": seconds}, f)
    row["seconds"] = seconds
    return row


def _log_size(log):
    return os.path.getsize(log) if os.path.isfile(log) else 0


def _study_unit(name, folder, flags, steps, o, log):
    ckpt = pretrain(folder, flags, steps, log)
    ev = [f"--ckpt={ckpt}"] + o["same"]
    row = {"name": name, "steps": steps, "flops": tokenizer_flops(flags, steps)}
    probe = evaluate("probe", os.path.join(folder, "eval_probe.json"), ev, log)
    recon = evaluate("recon", os.path.join(folder, "eval_recon.json"), ev, log)
    row.update(probe=probe["linear_top1"], knn=probe["knn20_top1"], psnr=recon["psnr"], rfd=recon["rFD_judge"])
    row["zero_shot"] = None
    if "--loss.lambda_clip=0" not in flags:
        row["zero_shot"] = evaluate("zero-shot", os.path.join(folder, "eval_zero_shot.json"), ev, log)["top1"]
    row.update(dit_unit(os.path.join(folder, "dit"), ckpt, o, log))
    return row


def dit_unit(dit_dir, ckpt, o, log, seed=0):
    """
    A DiT on the tokenizer `ckpt` (seed `seed`), evaluated with and without guidance at the steps of o["curve_at"]
    (every DiT checkpoint is kept for this). Returns the final step's judge accuracy and gFD_judge per guidance scale,
    `curve` {scale: [[DiT step, gFD_judge, judge accuracy], ...]} and the last sample grid.
    """
    n = o["dit_steps"]
    final_dit = os.path.join(dit_dir, f"ckpt_{n:07d}.pt")
    if not os.path.isfile(final_dit):
        run(["train_dit.py", f"--tokenizer={ckpt}", f"--dit.out_dir={dit_dir}", f"--dit.max_steps={n}",
             f"--dit.ckpt_every={o['dit_ckpt_every']}", "--dit.keep_ckpts=0", f"--run.seed={seed}"]
            + o["dit_flags"], log)  # a re-run resumes from the DiT's last checkpoint
    out = {"curve": {}}
    for scale in GUIDANCE:
        curve = []
        for at in o["curve_at"]:
            gen = evaluate("gen", os.path.join(dit_dir, f"eval_gen_{at:07d}_cfg{scale:g}.json"),
                           [f"--dit_ckpt={os.path.join(dit_dir, f'ckpt_{at:07d}.pt')}", f"--eval.cfg_scale={scale}",
                            f"--eval.num_gen={o['num_gen']}", f"--eval.gen_steps={o['gen_steps']}"] + o["same"], log)
            curve.append([at, gen["gFD_judge"], gen["judge_accuracy"]])
        out["curve"][f"{scale:g}"] = curve
        out[f"judge_acc_cfg{scale:g}"], out[f"gfd_cfg{scale:g}"] = curve[-1][2], curve[-1][1]
    out["grid"] = last_grid(dit_dir)
    return out


def variance_unit(base, folder, seed, o, log):
    """Another DiT seed on the tokenizer of the row `base` (whose tokenizer columns it repeats), timed alone."""
    dit_dir = os.path.join(folder, f"dit_seed{seed}")
    row = timed(dit_dir, log, lambda: dit_unit(dit_dir, os.path.join(folder, f"ckpt_{base['steps']:07d}.pt"), o, log,
                                               seed=seed))
    keep = ("name", "steps", "flops", "probe", "knn", "psnr", "rfd", "zero_shot", "commit", "config")
    return {**{k: base[k] for k in keep}, **row, "label": f"{base['name']}, DiT seed {seed}", "dit_seed": seed}


def last_grid(dit_dir):
    """The sample grid train_dit.py wrote last (samples_<step>.png), or None."""
    grids = sorted(f for f in os.listdir(dit_dir) if f.startswith("samples_") and f.endswith(".png"))
    return os.path.join(dit_dir, grids[-1]) if grids else None


# -----------------------------------------------------------------------------
# Output: a markdown table, a JSON file and two PNG plots drawn with PIL (no plotting library).


def fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def results_table(rows):
    head = ("| tokenizer | stage-1 steps | GFLOPs | linear probe | k-NN | zero-shot | PSNR | rFD_judge | "
            "judge acc (cfg 1 / 4) | gFD_judge (cfg 1 / 4) | wall |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        wall = "?" if r.get("seconds") is None else f"{r['seconds'] / 60:.1f} min"
        lines.append(f"| {r.get('label', r['name'])} | {r['steps']} | {r['flops'] / 1e9:.0f} | {fmt(r['probe'])}% "
                     f"| {fmt(r['knn'])}% "
                     f"| {fmt(r['zero_shot'])}{'%' if r['zero_shot'] is not None else ''} | {r['psnr']:.2f} dB "
                     f"| {r['rfd']:.3f} | {100 * r['judge_acc_cfg1']:.1f}% / {100 * r['judge_acc_cfg4']:.1f}% "
                     f"| {r['gfd_cfg1']:.3f} / {r['gfd_cfg4']:.3f} | {wall} |")
    return "\n".join(lines)


def reach_step(curve, target):
    """
    The DiT steps at which a curve [[step, gFD_judge, accuracy], ...] first reaches gFD_judge <= target, linearly
    interpolated in log(step) between the two evaluated steps around the crossing; ("<=", first step) when the first
    evaluated step is already there, (None, None) when it never gets there.
    """
    prev = None
    for step, gfd, _ in curve:
        if gfd <= target:
            if prev is None:
                return "<=", step
            (s0, g0) = prev
            frac = (g0 - target) / (g0 - gfd)
            return "~", round(math.exp(math.log(s0) + frac * (math.log(step) - math.log(s0))))
        prev = (step, gfd)
    return None, None


def convergence_table(rows, reference="AE"):
    """gFD_judge of each DiT along its training, and the steps it needs to reach the final gFD_judge of the
    `reference` tokenizer's DiT (speed-up = the reference's steps / those steps)."""
    ref = next((r for r in rows if r.get("label", r["name"]) == reference), None)
    steps = [at for at, _, _ in rows[0]["curve"]["1"]]
    head = "| tokenizer | " + " | ".join(f"gFD_judge cfg {g:g} at {', '.join(map(str, steps))} DiT steps"
                                                  for g in GUIDANCE)
    if ref is not None:
        head += " | " + " | ".join(f"steps to {reference}'s final (cfg {g:g})" for g in GUIDANCE)
    lines = [head + " |", "|" + "---|" * (head.count("|"))]
    for r in rows:
        cells = [" / ".join(f"{gfd:.0f}" for _, gfd, _ in r["curve"][f"{g:g}"]) for g in GUIDANCE]
        if ref is not None:
            for g in GUIDANCE:
                bound, at = reach_step(r["curve"][f"{g:g}"], ref["curve"][f"{g:g}"][-1][1])
                full = ref["curve"][f"{g:g}"][-1][0]
                cells.append("never" if at is None else f"{bound}{at} ({'>=' if bound == '<=' else ''}"
                                                         f"{full / at:.1f}x)")
        lines.append(f"| {r.get('label', r['name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_commit():
    """HEAD of the repository this script is in, with "-dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences_from_tiny(config):
    """{field: [unit's value, PRESETS["tiny"]()'s value]} for every field of a unit's config (a `Config.to_dict()`,
    possibly read back from JSON) that differs from today's tiny preset, leaving out UNIT_PATH_KEYS."""
    tiny = _flat(json.loads(json.dumps(PRESETS["tiny"]().to_dict())))  # through JSON: tuples compare as lists
    unit = _flat(json.loads(json.dumps(config)))
    return {k: [unit.get(k), tiny.get(k)] for k in sorted(set(unit) | set(tiny))
            if k not in UNIT_PATH_KEYS and unit.get(k) != tiny.get(k)}


def unit_record(folder, flags, steps):
    """The commit and full config a unit was started with, written once to folder/unit.json (a study resumed on
    a later commit keeps the commit that trained the tokenizer)."""
    path = os.path.join(folder, "unit.json")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"commit": git_commit(), "config": parse_config(unit_flags(folder, flags, steps)).to_dict()}, f)
    with open(path) as f:
        return json.load(f)


def nice_ticks(lo, hi, log=False):
    """Round tick values inside [lo, hi]: 1-2-5 steps, or on a log axis 1, 2, 5 x 10^k (every digit if too few, and
    the linear ticks on an axis too short for three)."""
    if log:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
            ticks = [m * 10 ** e for e in decades for m in mantissas if lo <= m * 10 ** e <= hi]
            if len(ticks) >= 3:
                return ticks if len(ticks) <= 8 else ticks[::math.ceil(len(ticks) / 8)]
    raw = (hi - lo) / 5
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda v: abs(v - raw))
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def tick_label(v):
    return f"{v:.0e}".replace("e+", "e") if abs(v) >= 1e5 else f"{v:g}"


def line_plot(path, series, xlabel, ylabel, title, logx=False, logy=False, xticks=None, size=(640, 420)):
    """A scatter/line plot of {name: [(x, y), ...]} (points joined in x order) with axes, ticks (round values, or
    `xticks`) and a legend."""
    W, H = size
    left, right, top, bottom = 70, 20, 40, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = plot_font()
    pts = [(x, y) for s in series.values() for x, y in s]
    tx = (lambda x: math.log10(x)) if logx else (lambda x: x)
    ty = (lambda y: math.log10(y)) if logy else (lambda y: y)
    xs, ys = [tx(x) for x, _ in pts], [ty(y) for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.08 or 1.0, (y1 - y0) * 0.1 or 1.0
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    px = lambda x: left + (tx(x) - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (ty(y) - y0) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    back = (lambda v: 10 ** v) if logy else (lambda v: v)
    for yv in nice_ticks(back(y0), back(y1), logy):
        draw.line([left - 4, py(yv), left, py(yv)], fill="black")
        draw.text((left - 8, py(yv)), tick_label(yv), fill="black", font=font, anchor="rm")
    back = (lambda v: 10 ** v) if logx else (lambda v: v)
    for xv in xticks or nice_ticks(back(x0), back(x1), logx):
        draw.line([px(xv), H - bottom, px(xv), H - bottom + 4], fill="black")
        draw.text((px(xv), H - bottom + 8), tick_label(xv), fill="black", font=font, anchor="mt")
    draw.text((W / 2, H - 22), xlabel, fill="black", font=font, anchor="mm")
    draw.text((5, 10), ylabel, fill="black", font=font)
    draw.text((W / 2, 18), title, fill="black", font=font, anchor="mm")
    lx = W - right - 20 - max(draw.textlength(name, font=font) for name in series)  # the legend, inside the frame
    for i, (name, s) in enumerate(series.items()):
        color = COLORS.get(name, (0, 0, 0))
        s = sorted(s)
        if len(s) > 1:
            draw.line([(px(x), py(y)) for x, y in s], fill=color, width=2)
        for x, y in s:
            draw.ellipse([px(x) - 4, py(y) - 4, px(x) + 4, py(y) + 4], fill=color)
        draw.rectangle([lx - 15, top + 8 + 16 * i, lx - 5, top + 18 + 16 * i], fill=color)
        draw.text((lx, top + 13 + 16 * i), name, fill="black", font=font, anchor="lm")
    img.save(path)
    return path


def plot_font():
    try:
        return ImageFont.load_default(size=13)  # Pillow >= 10.1: a scalable font with readable spaces
    except TypeError:
        return ImageFont.load_default()


def grids_side_by_side(path, rows):
    """The last sample grid of each DiT, side by side under its tokenizer's name."""
    grids = [(r["name"], Image.open(r["grid"]).convert("RGB")) for r in rows
             if r.get("grid") and os.path.isfile(r["grid"])]
    if not grids:
        return None
    h = max(g.height for _, g in grids) + 20
    out = Image.new("RGB", (sum(g.width + 10 for _, g in grids), h), "white")
    x = 0
    draw = ImageDraw.Draw(out)
    for name, g in grids:
        draw.text((x + 2, 4), name, fill="black", font=plot_font())
        out.paste(g, (x, 20))
        x += g.width + 10
    out.save(path)
    return path


# -----------------------------------------------------------------------------


OPTIONS = {"quick": False, "scaling": False, "report": False, "out": "", "steps": 0, "dit_steps": 0, "num_gen": 256,
           "gen_steps": 50}


def parse_args(argv):
    opts = dict(OPTIONS)
    rest = []
    for a in argv:
        key, eq, val = a[2:].partition("=")
        if a.startswith("--") and key in opts:
            opts[key] = True if not eq else (val if isinstance(opts[key], str) else int(val))
        else:
            rest.append(a)
    parse_config(rest)  # a wrong --key=value fails here, naming it, before anything runs
    return opts, rest


def main(argv):
    opts, flags = parse_args(argv)
    base = parse_config(flags)
    if base.data.dataset != "builtin":
        raise ConfigError("the study needs the built-in data: its judge knows only the built-in scenes")
    out = opts["out"] or os.path.join(ROOT, "runs", "scaling" if opts["scaling"] else "ablation")
    if opts["report"]:
        return report_only(out)
    os.makedirs(out, exist_ok=True)
    o = {"eval_images": 1000, "judge_images": 20_000, "judge_dir": os.path.join(out, "judge"), "dit_flags": []}
    o.update(num_gen=opts["num_gen"], gen_steps=opts["gen_steps"])
    steps = opts["steps"] or base.train.max_steps
    o["dit_steps"] = opts["dit_steps"] or base.dit.max_steps
    if opts["quick"]:
        o.update(QUICK)
        steps = QUICK["steps"]
        flags = flags + ["--encoder.depth=1", "--decoder.depth=1", "--text.depth=1", "--train.log_every=1",
                         "--train.preview_every=1000"]
        o["dit_flags"] = ["--dit.num_cache_images=32", "--dit.stats_images=32", "--sample.num_steps=2",
                          "--dit.grid_classes=2", "--dit.grid_per_class=2", "--dit.batch_size=8"]
    o["same"] = [f"--eval.num_images={o['eval_images']}", f"--eval.judge_dir={o['judge_dir']}",
                 f"--eval.judge_images={o['judge_images']}"]  # every evaluation: the same images and the same judge
    # the loss ablation follows each DiT's training (1/8 ... 1 of its steps), the scaling study only its end
    fractions = (1,) if opts["scaling"] else (1 / 2, 1) if opts["quick"] else CONVERGENCE
    o["curve_at"] = sorted({max(1, round(f * o["dit_steps"])) for f in fractions})
    o["dit_ckpt_every"] = math.gcd(*o["curve_at"])  # a checkpoint at every evaluated step
    log = os.path.join(out, "log.txt")
    t0 = time.time()
    units = ([(f"{v} {b}x", v, b * steps) for b in SCALING_BUDGETS for v in SCALING_VARIANTS] if opts["scaling"]
             else [(v, v, steps) for v in VARIANTS])
    rows = []
    for label, variant, n in units:
        folder = os.path.join(out, label.replace(" ", "_").replace("+", "_"))
        print(f"[{time.time() - t0:7.0f} s] {label}: {n} stage-1 steps, then a {o['dit_steps']}-step DiT ({folder})",
              flush=True)
        record = unit_record(folder, flags + VARIANTS[variant], n)
        row = study_unit(variant, folder, flags + VARIANTS[variant], n, o, log)
        rows.append({**row, **record, "label": label})
        write_results(out, rows, opts, argv, flags, t0)  # what is done is saved as the study goes
    if not opts["scaling"]:  # the DiT's own seed: the yardstick for the differences between tokenizers
        folder = os.path.join(out, "CLIP_SSL_AE")
        for seed in VARIANCE_SEEDS:
            print(f"[{time.time() - t0:7.0f} s] CLIP+SSL+AE: DiT seed {seed}", flush=True)
            vtp = next(r for r in rows if r["name"] == "CLIP+SSL+AE" and "dit_seed" not in r)
            rows.append(variance_unit(vtp, folder, seed, o, log))
            write_results(out, rows, opts, argv, flags, t0)
    table = results_table(rows)
    print(table)
    print(f"wrote {out}/results.md and results.json in {time.time() - t0:.0f} s")
    return rows


def report_only(out):
    """Redraw results.md and the plots of the study in `out` from its results.json, running nothing."""
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    rows = [{**r, "grid": r["grid"] and os.path.join(out, r["grid"])} for r in saved["rows"]]
    opts = {**OPTIONS, **saved["options"]}
    write_report(out, rows, opts, saved["argv"])
    return rows


def write_results(out, rows, opts, argv, flags, t0):
    """results.json (rows with their commit and config), results.md (tables, plots) and the PNGs, from the rows so
    far."""
    portable = [{**r, "grid": r["grid"] and os.path.relpath(r["grid"], out)} for r in rows]  # movable with `out`
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"commit": git_commit(), "rows": portable, "wall_s": time.time() - t0,
                   "units_s": sum(r["seconds"] or 0 for r in rows), "options": opts, "flags": flags, "argv": argv}, f,
                  indent=2)
    write_report(out, rows, opts, argv)


def write_report(out, rows, opts, argv):
    """results.md and its plots from the rows (`--report` redraws them from a finished study's results.json)."""
    units = [r for r in rows if "dit_seed" not in r]
    md = [f"# {'Tokenizer scaling' if opts['scaling'] else 'Loss ablation'} in miniature", "",
          f"`python scripts/ablation.py {' '.join(argv)}`", "", results_table(rows), ""]
    for scale in GUIDANCE:  # one plot per guidance scale: the two can disagree, and neither is hidden
        key, suffix = f"gfd_cfg{scale:g}", "" if scale == 1 else f"_cfg{scale:g}"
        if opts["scaling"]:
            series = {v: [(r["flops"], r[key]) for r in units if r["name"] == v] for v in SCALING_VARIANTS}
            series = {v: pts for v, pts in series.items() if pts}
            name = line_plot(os.path.join(out, f"scaling{suffix}.png"), series, "stage-1 training FLOPs (log scale)",
                             f"gFD_judge (cfg {scale:g}, log scale)", "generation vs tokenizer compute", logx=True,
                             logy=True)
            md.append(f"![scaling, guidance {scale:g}]({os.path.basename(name)})")
        else:
            series = {r["name"]: [(r["probe"], r[key])] for r in units}
            name = line_plot(os.path.join(out, f"probe_vs_gfd{suffix}.png"), series, "linear probe top-1 (%)",
                             f"gFD_judge (cfg {scale:g})", "generation vs understanding")
            md.append(f"![generation vs understanding, guidance {scale:g}]({os.path.basename(name)})")
    if not opts["scaling"]:
        md += ["", "## DiT convergence", "", convergence_table(rows), ""]
        for scale in GUIDANCE:
            suffix = "" if scale == 1 else f"_cfg{scale:g}"
            series = {r.get("label", r["name"]): [(at, gfd) for at, gfd, _ in r["curve"][f"{scale:g}"]] for r in rows}
            name = line_plot(os.path.join(out, f"convergence{suffix}.png"), series, "DiT steps (log scale)",
                             f"gFD_judge (cfg {scale:g}, log scale)", "DiT convergence per tokenizer", logx=True,
                             logy=True, xticks=sorted({at for pts in series.values() for at, _ in pts}))
            md.append(f"![DiT convergence, guidance {scale:g}]({os.path.basename(name)})")
        samples = os.path.join(out, "samples.png")  # kept as it is where the grids were not copied with the study
        if grids_side_by_side(samples, units) or os.path.isfile(samples):
            md.append("![samples](samples.png)")
    md += ["", "## Recipe", "", "Each unit's commit and full config are in results.json; against `PRESETS[\"tiny\"]()` "
           f"of {git_commit()[:12]} (leaving out {', '.join(UNIT_PATH_KEYS)}):", ""]
    for r in units:
        diff = differences_from_tiny(r["config"])
        md.append(f"- {r['label']} (commit {r['commit'][:12]}): " +
                  (", ".join(f"{k}={v[0]} (tiny: {v[1]})" for k, v in diff.items()) or "the tiny preset"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
