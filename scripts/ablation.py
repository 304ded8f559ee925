"""
The paper's two findings in miniature, on the built-in data (the README's "Reproducing the paper's findings in
miniature"): the loss ablation (the paper's Figure 2: understanding drives generation) and tokenizer scaling (its
Figure 1: VTP keeps improving with stage-1 compute, a reconstruction-only AE does not).

    python scripts/ablation.py                   # AE, CLIP+AE, SSL+AE, CLIP+SSL+AE at equal stage-1 steps
    python scripts/ablation.py --scaling         # AE and CLIP+SSL+AE at 1x, 3x, 9x the stage-1 steps
    python scripts/ablation.py --quick           # a few steps of everything (the test runs this)

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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import benchmark  # noqa: E402  (written-out stage-1 FLOPs)
from model import ConfigError, parse_config, resolve_checkpoint, run_cli  # noqa: E402

# The paper's ablation: which objectives are on (lambda_rec at the preset's value always).
VARIANTS = {"AE": ["--loss.lambda_clip=0", "--loss.lambda_ssl=0"], "CLIP+AE": ["--loss.lambda_ssl=0"],
            "SSL+AE": ["--loss.lambda_clip=0"], "CLIP+SSL+AE": []}
SCALING_VARIANTS = ("AE", "CLIP+SSL+AE")
SCALING_BUDGETS = (1, 3, 9)
GUIDANCE = (1.0, 4.0)  # judge accuracy and gFD_judge without and with classifier-free guidance
QUICK = {"steps": 4, "dit_steps": 4, "num_gen": 16, "gen_steps": 2, "eval_images": 32, "judge_images": 256}
COLORS = {"AE": (200, 60, 40), "CLIP+AE": (40, 120, 200), "SSL+AE": (40, 160, 80), "CLIP+SSL+AE": (120, 50, 170)}


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


def pretrain(folder, flags, steps, log):
    """Stage 1 into `folder` for `steps` steps (resumed if a checkpoint is there); returns the final checkpoint."""
    final = os.path.join(folder, f"ckpt_{steps:07d}.pt")
    if not os.path.isfile(final):
        resume = ["--train.resume=true"] if resolve_checkpoint(folder) else []
        run(["pretrain.py", f"--train.out_dir={folder}", f"--train.max_steps={steps}",
             f"--train.ckpt_every={max(1, steps // 4)}"] + flags + resume, log)
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
    """
    One tokenizer end to end: pre-train, evaluate, DiT on its latents, evaluate the samples. Returns its row, with
    `seconds`: the wall time spent on this unit, summed over every run of the study that did some of its work (kept
    in `folder/seconds.json`, so a resumed study still reports the whole cost; None for a unit finished before the
    file existed).
    """
    os.makedirs(folder, exist_ok=True)
    t0, n_log = time.time(), _log_size(log)
    row = _study_unit(name, folder, flags, steps, o, log)
    timing = os.path.join(folder, "seconds.json")
    seconds = json.load(open(timing))["seconds"] if os.path.isfile(timing) else None
    if _log_size(log) > n_log:  # this call ran some of the unit's stages (each one appends to the log)
        seconds = (seconds or 0.0) + time.time() - t0
        with open(timing, "w") as f:
            json.dump({"seconds": seconds}, f)
    row["seconds"] = seconds
    return row


def _log_size(log):
    return os.path.getsize(log) if os.path.isfile(log) else 0


def _study_unit(name, folder, flags, steps, o, log):
    ckpt = pretrain(folder, flags, steps, log)
    same = [f"--eval.num_images={o['eval_images']}", f"--eval.judge_dir={o['judge_dir']}",
            f"--eval.judge_images={o['judge_images']}"]  # every evaluation: the same images and the same judge
    ev = [f"--ckpt={ckpt}"] + same
    row = {"name": name, "steps": steps, "flops": tokenizer_flops(flags, steps)}
    probe = evaluate("probe", os.path.join(folder, "eval_probe.json"), ev, log)
    recon = evaluate("recon", os.path.join(folder, "eval_recon.json"), ev, log)
    row.update(probe=probe["linear_top1"], knn=probe["knn20_top1"], psnr=recon["psnr"], rfd=recon["rFD_judge"])
    row["zero_shot"] = None
    if "--loss.lambda_clip=0" not in flags:
        row["zero_shot"] = evaluate("zero-shot", os.path.join(folder, "eval_zero_shot.json"), ev, log)["top1"]
    dit_dir = os.path.join(folder, "dit")
    final_dit = os.path.join(dit_dir, f"ckpt_{o['dit_steps']:07d}.pt")
    if not os.path.isfile(final_dit):
        run(["train_dit.py", f"--tokenizer={ckpt}", f"--dit.out_dir={dit_dir}", f"--dit.max_steps={o['dit_steps']}",
             f"--dit.ckpt_every={max(1, o['dit_steps'] // 4)}"] + o["dit_flags"], log)
    for scale in GUIDANCE:
        gen = evaluate("gen", os.path.join(folder, f"eval_gen_cfg{scale:g}.json"),
                       [f"--dit_ckpt={final_dit}", f"--eval.cfg_scale={scale}", f"--eval.num_gen={o['num_gen']}",
                        f"--eval.gen_steps={o['gen_steps']}"] + same, log)
        row[f"judge_acc_cfg{scale:g}"], row[f"gfd_cfg{scale:g}"] = gen["judge_accuracy"], gen["gFD_judge"]
    row["grid"] = last_grid(dit_dir)
    return row


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
        lines.append(f"| {r['name']} | {r['steps']} | {r['flops'] / 1e9:.0f} | {fmt(r['probe'])}% | {fmt(r['knn'])}% "
                     f"| {fmt(r['zero_shot'])}{'%' if r['zero_shot'] is not None else ''} | {r['psnr']:.2f} dB "
                     f"| {r['rfd']:.3f} | {100 * r['judge_acc_cfg1']:.1f}% / {100 * r['judge_acc_cfg4']:.1f}% "
                     f"| {r['gfd_cfg1']:.3f} / {r['gfd_cfg4']:.3f} | {wall} |")
    return "\n".join(lines)


def line_plot(path, series, xlabel, ylabel, title, logx=False, size=(640, 420)):
    """A scatter/line plot of {name: [(x, y), ...]} (points joined in x order) with axes, ticks and a legend."""
    W, H = size
    left, right, top, bottom = 70, 20, 40, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts = [(x, y) for s in series.values() for x, y in s]
    tx = (lambda x: math.log10(x)) if logx else (lambda x: x)
    xs, ys = [tx(x) for x, _ in pts], [y for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.08 or 1.0, (y1 - y0) * 0.1 or 1.0
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    px = lambda x: left + (tx(x) - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(5):  # ticks
        yv = y0 + (y1 - y0) * k / 4
        draw.line([left - 4, py(yv), left, py(yv)], fill="black")
        draw.text((5, py(yv) - 6), f"{yv:.3g}", fill="black", font=font)
        xv = x0 + (x1 - x0) * k / 4
        label = f"{10 ** xv:.2g}" if logx else f"{xv:.3g}"
        xp = left + (xv - x0) / (x1 - x0) * (W - left - right)
        draw.line([xp, H - bottom, xp, H - bottom + 4], fill="black")
        draw.text((xp - 15, H - bottom + 8), label, fill="black", font=font)
    draw.text((W / 2 - 3 * len(xlabel), H - 25), xlabel, fill="black", font=font)
    draw.text((5, 10), ylabel, fill="black", font=font)
    draw.text((W / 2 - 3 * len(title), 10), title, fill="black", font=font)
    for i, (name, s) in enumerate(series.items()):
        color = COLORS.get(name, (0, 0, 0))
        s = sorted(s)
        if len(s) > 1:
            draw.line([(px(x), py(y)) for x, y in s], fill=color, width=2)
        for x, y in s:
            draw.ellipse([px(x) - 4, py(y) - 4, px(x) + 4, py(y) + 4], fill=color)
        draw.rectangle([W - right - 120, top + 8 + 14 * i, W - right - 110, top + 18 + 14 * i], fill=color)
        draw.text((W - right - 105, top + 6 + 14 * i), name, fill="black", font=font)
    img.save(path)
    return path


def grids_side_by_side(path, rows):
    """The last sample grid of each DiT, side by side under its tokenizer's name."""
    grids = [(r["name"], Image.open(r["grid"]).convert("RGB")) for r in rows if r.get("grid")]
    if not grids:
        return None
    h = max(g.height for _, g in grids) + 20
    out = Image.new("RGB", (sum(g.width + 10 for _, g in grids), h), "white")
    x = 0
    draw = ImageDraw.Draw(out)
    for name, g in grids:
        draw.text((x + 2, 4), name, fill="black", font=ImageFont.load_default())
        out.paste(g, (x, 20))
        x += g.width + 10
    out.save(path)
    return path


# -----------------------------------------------------------------------------


def parse_args(argv):
    opts = {"quick": False, "scaling": False, "out": "", "steps": 0, "dit_steps": 0, "num_gen": 256, "gen_steps": 50}
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
    log = os.path.join(out, "log.txt")
    t0 = time.time()
    units = ([(f"{v} {b}x", v, b * steps) for b in SCALING_BUDGETS for v in SCALING_VARIANTS] if opts["scaling"]
             else [(v, v, steps) for v in VARIANTS])
    rows = []
    for label, variant, n in units:
        folder = os.path.join(out, label.replace(" ", "_").replace("+", "_"))
        print(f"[{time.time() - t0:7.0f} s] {label}: {n} stage-1 steps, then a {o['dit_steps']}-step DiT ({folder})",
              flush=True)
        row = study_unit(variant, folder, flags + VARIANTS[variant], n, o, log)
        row["label"] = label
        rows.append(row)
    portable = [{**r, "grid": r["grid"] and os.path.relpath(r["grid"], out)} for r in rows]  # movable with `out`
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"rows": portable, "wall_s": time.time() - t0, "units_s": sum(r["seconds"] or 0 for r in rows),
                   "options": opts, "flags": flags}, f, indent=2)
    table = results_table(rows)
    md = [f"# {'Tokenizer scaling' if opts['scaling'] else 'Loss ablation'} in miniature", "",
          f"`python scripts/ablation.py {' '.join(argv)}`", "", table, ""]
    for scale in GUIDANCE:  # one plot per guidance scale: the two can disagree, and neither is hidden
        key, suffix = f"gfd_cfg{scale:g}", "" if scale == 1 else f"_cfg{scale:g}"
        if opts["scaling"]:
            series = {v: [(r["flops"], r[key]) for r in rows if r["name"] == v] for v in SCALING_VARIANTS}
            name = line_plot(os.path.join(out, f"scaling{suffix}.png"), series, "stage-1 training FLOPs (log scale)",
                             f"gFD_judge (cfg {scale:g})", "generation vs tokenizer compute", logx=True)
            md.append(f"![scaling, guidance {scale:g}]({os.path.basename(name)})")
        else:
            series = {r["name"]: [(r["probe"], r[key])] for r in rows}
            name = line_plot(os.path.join(out, f"probe_vs_gfd{suffix}.png"), series, "linear probe top-1 (%)",
                             f"gFD_judge (cfg {scale:g})", "generation vs understanding")
            md.append(f"![generation vs understanding, guidance {scale:g}]({os.path.basename(name)})")
    if not opts["scaling"]:
        if grids_side_by_side(os.path.join(out, "samples.png"), rows):
            md.append("![samples](samples.png)")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(table)
    print(f"wrote {out}/results.md and results.json in {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
