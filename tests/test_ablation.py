"""scripts/ablation.py: the study runs end to end in --quick mode, resumes without redoing work, counts FLOPs."""

import json
import os
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import ablation  # noqa: E402

sys.path.pop(0)


def test_tokenizer_flops_follow_the_objectives_and_steps():
    ae = ablation.tokenizer_flops(ablation.VARIANTS["AE"], 10)
    clip = ablation.tokenizer_flops(ablation.VARIANTS["CLIP+AE"], 10)
    ssl = ablation.tokenizer_flops(ablation.VARIANTS["SSL+AE"], 10)
    vtp = ablation.tokenizer_flops(ablation.VARIANTS["CLIP+SSL+AE"], 10)
    assert 0 < ae < clip < vtp and ae < ssl < vtp
    assert vtp - ae == pytest.approx((clip - ae) + (ssl - ae), rel=1e-9)  # the parts add up
    assert ablation.tokenizer_flops([], 30) == pytest.approx(3 * vtp, rel=1e-9)


def test_line_plot_draws_every_series(tmp_path):
    path = ablation.line_plot(str(tmp_path / "p.png"), {"AE": [(1e9, 3.0), (1e10, 2.9)], "CLIP+SSL+AE": [(1e9, 2.0)]},
                              "x", "y", "t", logx=True)
    img = Image.open(path).convert("RGB")
    assert img.size == (640, 420)
    colors = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert ablation.COLORS["AE"] in colors and ablation.COLORS["CLIP+SSL+AE"] in colors
    ablation.line_plot(path, {"AE": [(500, 4700.0), (4000, 517.0)]}, "x", "y", "t", logx=True, logy=True,
                       xticks=[500, 4000])  # log on both axes: values spanning a decade


def test_ticks_are_round_values_inside_the_axis():
    assert ablation.nice_ticks(0.0, 10.0) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert ablation.nice_ticks(474.0, 521.0) == [480, 490, 500, 510, 520]
    assert ablation.nice_ticks(380.0, 7000.0, log=True) == [500, 1000, 2000, 5000]
    assert ablation.nice_ticks(1.5e12, 2e14, log=True) == [2e12, 5e12, 1e13, 2e13, 5e13, 1e14, 2e14]
    assert ablation.nice_ticks(420.0, 580.0, log=True) == list(range(420, 581, 20))  # a short axis
    assert [ablation.tick_label(v) for v in (500, 2.5, 2e13)] == ["500", "2.5", "2e13"]


def test_reach_step_interpolates_in_log_steps():
    curve = [[500, 900.0, 0.5], [1000, 700.0, 0.6], [2000, 500.0, 0.7], [4000, 400.0, 0.8]]
    assert ablation.reach_step(curve, 600.0) == ("~", round(2 ** 0.5 * 1000))  # halfway from 1000 to 2000 in log
    assert ablation.reach_step(curve, 400.0) == ("~", 4000)
    assert ablation.reach_step(curve, 950.0) == ("<=", 500)  # already there at the first evaluated step
    assert ablation.reach_step(curve, 300.0) == (None, None)


def test_differences_from_tiny_name_every_changed_field():
    from model import PRESETS

    cfg = PRESETS["tiny"]().to_dict()
    assert ablation.differences_from_tiny(json.loads(json.dumps(cfg))) == {}  # tuples read back from JSON as lists
    cfg["train"].update(out_dir="elsewhere", max_steps=3, ckpt_every=1)  # a unit's own folder and steps
    cfg["loss"]["lambda_ssl"] = 0.0
    assert ablation.differences_from_tiny(cfg) == {"loss.lambda_ssl": [0.0, PRESETS["tiny"]().loss.lambda_ssl]}


def test_quick_study_runs_end_to_end_and_resumes(tmp_path):
    out = str(tmp_path / "study")
    rows = ablation.main(["--quick", f"--out={out}"])
    units = rows[:len(ablation.VARIANTS)]
    assert [r["name"] for r in units] == list(ablation.VARIANTS)
    assert [r["label"] for r in rows[len(units):]] == [f"CLIP+SSL+AE, DiT seed {s}" for s in ablation.VARIANCE_SEEDS]
    for r in rows:  # the DiT followed along its training (--quick: 2 and 4 of its 4 steps), with and without guidance
        assert [[at for at, _, _ in r["curve"][g]] for g in ("1", "4")] == [[2, 4], [2, 4]]
        assert r["curve"]["1"][-1][1:] == [r["gfd_cfg1"], r["judge_acc_cfg1"]]
    assert rows[-1]["gfd_cfg1"] != rows[-2]["gfd_cfg1"] and rows[-1]["probe"] == rows[-2]["probe"]  # same tokenizer
    rows = units
    for r in rows:
        assert 0 <= r["probe"] <= 100 and 0 <= r["knn"] <= 100 and r["psnr"] > 0 and r["rfd"] >= 0
        assert 0 <= r["judge_acc_cfg1"] <= 1 and 0 <= r["judge_acc_cfg4"] <= 1 and r["gfd_cfg1"] >= 0
        assert (r["zero_shot"] is None) == (r["name"] in ("AE", "SSL+AE"))  # zero-shot only where CLIP is on
    assert rows[0]["flops"] < rows[-1]["flops"]
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["commit"] == ablation.git_commit() and len(saved["commit"]) >= 40
    assert all(r["commit"] == saved["commit"] for r in saved["rows"])  # the DiT seed's row names its tokenizer's too
    saved = saved["rows"][:len(units)]
    assert [r["name"] for r in saved] == list(ablation.VARIANTS)
    # each unit's full config: the tiny preset apart from its folder, steps, --quick's flags and its variant's λs
    quick = {"encoder.depth", "decoder.depth", "text.depth", "train.log_every", "train.preview_every"}
    assert set(ablation.differences_from_tiny(saved[-1]["config"])) == quick
    assert set(ablation.differences_from_tiny(saved[0]["config"])) == quick | {"loss.lambda_clip", "loss.lambda_ssl"}
    assert saved[0]["config"]["train"]["max_steps"] == 4 and saved[0]["commit"] == ablation.git_commit()
    for r in saved:  # sample grids are named relative to the study folder, so results.json moves with it
        assert not os.path.isabs(r["grid"]) and os.path.isfile(os.path.join(out, r["grid"]))
    md = open(os.path.join(out, "results.md")).read()
    assert all(f"| {v} |" in md for v in ablation.VARIANTS)
    # one plot per guidance scale and measure, each in results.md
    for png in ("probe_vs_gfd.png", "probe_vs_gfd_cfg4.png", "convergence.png", "convergence_cfg4.png"):
        assert os.path.isfile(os.path.join(out, png)) and f"({png})" in md
    assert all(r["seconds"] > 0 for r in rows) and "| ? |" not in md
    # Resumable: a finished study re-runs nothing; a lost result is redone alone, and its unit's time grows by the
    # redo while the others' stay as recorded.
    log = os.path.join(out, "log.txt")
    n_runs = open(log).read().count("\n$ ")
    os.remove(os.path.join(out, "CLIP_AE", "eval_probe.json"))
    again = ablation.main(["--quick", f"--out={out}"])[:len(units)]
    assert open(log).read().count("\n$ ") == n_runs + 1
    assert again[1]["probe"] == rows[1]["probe"]  # the same checkpoint evaluated again
    assert again[1]["seconds"] > rows[1]["seconds"]
    assert [r["seconds"] for i, r in enumerate(again) if i != 1] == [r["seconds"] for i, r in enumerate(rows) if i != 1]
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["units_s"] == pytest.approx(sum(r["seconds"] for r in saved["rows"]))
    # --report redraws results.md and the plots from results.json alone, running nothing and keeping results.json
    md, js = open(os.path.join(out, "results.md")).read(), open(os.path.join(out, "results.json")).read()
    os.remove(os.path.join(out, "results.md"))
    os.remove(os.path.join(out, "convergence.png"))
    ablation.main(["--report", f"--out={out}"])
    assert open(os.path.join(out, "results.md")).read() == md and os.path.isfile(os.path.join(out, "convergence.png"))
    assert open(os.path.join(out, "results.json")).read() == js and open(log).read().count("\n$ ") == n_runs + 1


def test_unknown_flag_fails_before_running(tmp_path):
    from model import ConfigError

    with pytest.raises(ConfigError):
        ablation.main(["--quick", f"--out={tmp_path}", "--no.such_key=1"])
    assert not os.listdir(tmp_path)


def test_a_failing_stage_stops_the_study_with_its_own_error(tmp_path):
    log, stdout, stderr = str(tmp_path / "log.txt"), sys.stdout, sys.stderr
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        ablation.run(["evaluate.py", "probe", f"--ckpt={tmp_path / 'no_such_run'}"], log)
    text = open(log).read()
    assert "$ python evaluate.py probe" in text and "error: FileNotFoundError" in text and "no_such_run" in text
    assert sys.stdout is stdout and sys.stderr is stderr  # the redirection ends with the stage


@pytest.mark.parametrize("study", ["ablation", "scaling"])
def test_committed_studies_record_the_recipe_of_every_unit(study):
    """The studies shipped in scripts/results/ say which commit and config produced each row, so a reader can diff a
    row's recipe against today's default (`differences_from_tiny`) instead of trusting a sentence."""
    import re

    from model import Config

    with open(os.path.join(ROOT, "scripts", "results", study, "results.json")) as f:
        saved = json.load(f)
    assert re.fullmatch(r"[0-9a-f]{40}", saved["commit"])
    variants = ablation.SCALING_VARIANTS if study == "scaling" else ablation.VARIANTS
    assert {r["name"] for r in saved["rows"]} == set(variants)
    for r in saved["rows"]:
        assert re.fullmatch(r"[0-9a-f]{40}", r["commit"]), r["name"]
        cfg = Config.from_dict(r["config"])  # a full config: every section, rebuilt without error
        assert set(r["config"]) >= {"encoder", "loss", "data", "optim", "train", "dit"}, r["name"]
        assert cfg.train.max_steps == r["steps"], r["name"]
        assert isinstance(ablation.differences_from_tiny(r["config"]), dict)
