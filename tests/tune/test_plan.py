"""``lmforge plan``: the budget parser, the L(N, D) fit, and a whole plan with test-sized probes.

    .venv/bin/pytest -q tests/tune/test_plan.py
"""

from __future__ import annotations

import itertools
import json
import math
import time
import types

import numpy as np
import pytest
import yaml

from lmforge.config import ConfigError, load_config
from lmforge.models.transformer import Transformer
from lmforge.train import loop
from lmforge.tune import plan as plan_module
from lmforge.tune.scaling import (
    BPB_FLOOR,
    REPEAT_HALF_LIFE,
    LossFit,
    ShapeCurve,
    effective_tokens,
    fit_loss,
    fit_shape_curve,
    parse_budget,
)
from tests.conftest import ROOT
from tests.in_process import call_cli


# ------------------------------------------------------------------ the budget
@pytest.mark.parametrize("text, seconds", [("90s", 90.0), ("5m", 300.0), ("2h", 7200.0), (" 1.5m ", 90.0),
                                           (".5h", 1800.0)])
def test_budget_units(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["5", "300", "5 minutes", "m", "0m", "-5m", "5d", "", None])
def test_budget_without_a_unit_is_an_error_naming_the_option(text):
    with pytest.raises(ConfigError, match="^--budget: expected a time with its unit"):
        parse_budget(text)


def test_budget_without_a_unit_through_the_cli_is_one_line(tmp_path, capsys):
    assert call_cli("plan", "--budget", "5", f"--runs_dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --budget:") and "\n" not in err and "'5'" in err
    assert not any(tmp_path.iterdir())  # nothing prepared, nothing written
    assert call_cli("plan", "--plan.budget=300", f"--runs_dir={tmp_path}") == 2  # YAML's number, same message
    assert capsys.readouterr().err.startswith("error: --budget: expected a time with its unit")


def test_unknown_gpu_is_an_error_naming_the_option(tmp_path, capsys):
    assert call_cli("plan", "--budget", "1h", "--gpu", "abacus-9000", f"--runs_dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --gpu: no datasheet figure for 'abacus-9000'") and "\n" not in err


# ------------------------------------------------------------------ the fit
TRUE = LossFit(E=1.6, A=60.0, a=0.34, B=400.0, b=0.38)


def test_fit_recovers_known_parameters_from_synthetic_points():
    grid = itertools.product([2e5, 5e5, 1e6, 2e6, 5e6], [1e5, 3e5, 1e6, 3e6, 1e7])
    fit = fit_loss([(n, d, TRUE.predict(n, d)) for n, d in grid])
    # Exact points: the optimizer's tolerance is the only error left.
    got, want = fit.as_dict(), TRUE.as_dict()
    for name, rel in {"E": 1e-3, "a": 1e-2, "b": 1e-2, "A": 5e-2, "B": 5e-2}.items():
        assert got[name] == pytest.approx(want[name], rel=rel), name
    assert fit.rms_error < 1e-4 and fit.points == 25


def test_fit_from_few_noisy_points_predicts_within_the_noise():
    """Eight probe-like points with 0.3% noise (about what 32 validation batches give): the prediction at a
    20x longer run stays within 1.5% of the truth; the exponents alone are not identifiable from so few."""
    rng = np.random.default_rng(0)
    shape = [(3e5, 2e5), (3e5, 5e5), (6e5, 2e5), (6e5, 4e5), (1.2e6, 1e5), (1.2e6, 3e5), (2e6, 1e5), (2e6, 2e5)]
    fit = fit_loss([(n, d, TRUE.predict(n, d) * (1 + 0.003 * rng.standard_normal())) for n, d in shape])
    assert fit.predict(1.3e6, 4e6) == pytest.approx(TRUE.predict(1.3e6, 4e6), rel=0.015)


def test_too_few_points_are_refused():
    with pytest.raises(ConfigError, match="too few"):
        fit_loss([(1e5, 1e5, 3.0)] * 4)


def test_exponents_stay_in_their_bounds_and_weights_pull_the_fit_to_near_points():
    """Points from a curve with b = 1.4 (outside the bounds) are fitted with b at its bound; a point far from the
    others, off the curve by 0.05, pulls the weighted fit toward itself more than the unweighted one."""
    steep = LossFit(E=1.6, A=60.0, a=0.34, B=4e7, b=1.4)
    grid = list(itertools.product([2e5, 5e5, 1e6, 2e6], [1e5, 3e5, 1e6]))
    fit = fit_loss([(n, d, steep.predict(n, d)) for n, d in grid])
    assert fit.b == pytest.approx(1.0) and 0.1 <= fit.a <= 1.0
    far = (1e6, 1e7, TRUE.predict(1e6, 1e7) + 0.05)
    points = [(n, d, TRUE.predict(n, d)) for n, d in grid] + [far]
    plain, weighted = fit_loss(points), fit_loss(points, [1.0] * len(grid) + [20.0])
    assert abs(weighted.predict(*far[:2]) - far[2]) < abs(plain.predict(*far[:2]) - far[2])
    pure = LossFit(E=0.0, A=60.0, a=0.34, B=400.0, b=0.38)  # no irreducible loss: E is held at the floor
    floored = fit_loss([(n, d, pure.predict(n, d)) for n, d in grid], min_e=BPB_FLOOR)
    free = fit_loss([(n, d, pure.predict(n, d)) for n, d in grid])
    assert abs(floored.E - BPB_FLOOR) < 1e-6 and free.E < 0.1


def test_confirmations_are_the_first_choice_and_the_speedrun_shape(monkeypatch):
    """The speedrun's 128x4 is always confirmed when it is a candidate; when it is the first choice, the runner-up."""
    asked = []
    monkeypatch.setattr(plan_module, "_probe", lambda cfg, folder, data, w, n, sec: asked.append((w, n, sec)))
    cfg = load_config(None, ["plan.confirm_fraction=0.2"])

    def rows(*shapes):
        return [{"d_model": w, "n_layers": n, "params": w * n, "predicted_bpb": 2.0 + i / 10}
                for i, (w, n) in enumerate(shapes)]

    probed = [{"d_model": w, "n_layers": n} for w, n in cfg.plan.probe_sizes]  # 64x2, 96x3, 128x4, 192x4
    assert plan_module._confirm(cfg, None, {}, rows((64, 2), (96, 2), (128, 4)), 300.0, probed) == ([], [])
    assert asked == [(64, 2, 60.0), (128, 4, 60.0)]  # _probe said None to each
    asked.clear()
    plan_module._confirm(cfg, None, {}, rows((128, 4), (96, 2), (64, 2)), 300.0, probed)
    # 96x2 was never probed: it is probed at plan.probe_seconds before its confirmation, for a curve of its own
    assert asked == [(128, 4, 60.0), (96, 2, 10.0), (96, 2, 30.0), (96, 2, 60.0)]
    weights = plan_module._weights([{"tokens": 1e6}, {"tokens": 2e5}, {"tokens": 5e4}], 1e9, 1e6)
    assert weights[0] == 1.0 and weights[0] > weights[1] > weights[2] == pytest.approx(1 / (1 + math.log(20)))


def test_repeated_tokens_count_for_less():
    assert effective_tokens(5e5, 1e6) == 5e5 and effective_tokens(5e5, None) == 5e5
    r = REPEAT_HALF_LIFE  # a second pass is worth r (1 - exp(-1 / r)) of a fresh one; no budget buys more than 1 + r
    assert effective_tokens(2e6, 1e6) == pytest.approx(1e6 * (1 + r * (1 - math.exp(-1 / r))))
    assert 1.5e6 < effective_tokens(2e6, 1e6) < 2e6 and effective_tokens(1e9, 1e6) <= 1e6 * (1 + r)


def test_the_recipe_is_the_speedrun_config():
    speedrun = load_config(ROOT / "configs" / "speedrun-cpu.yaml")
    for section in ("tokenizer", "model", "train"):
        got = getattr(speedrun, section).model_dump()
        for key, value in plan_module.RECIPE[section].items():
            want = {**got[key], **value} if isinstance(value, dict) else value
            assert got[key] == want, f"{section}.{key}"
    assert (speedrun.model.d_model, speedrun.model.n_layers) == plan_module.SPEEDRUN_SHAPE  # always confirmed


# ------------------------------------------------------------------ a whole plan, test-sized
SECONDS_PER_PARAM = 2e-7  # the fake step time: 0.03 s for the 32-wide probe, 0.06 s for the 64-wide one


def _fake_speed(monkeypatch) -> None:
    """The probes' clock (``lmforge.train.loop.time``) advanced only by the training forward, in proportion to the
    model's size: the probes' lengths and speeds are the test's, whatever else runs on the machine."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock.now, time=time.time))
    real = Transformer.forward

    def forward(self, idx, targets=None):
        if self.training:
            clock.now += SECONDS_PER_PARAM * self.num_params()
        return real(self, idx, targets)

    monkeypatch.setattr(Transformer, "forward", forward)


def _plan_args(runs, corpus) -> list[str]:
    return ["plan", "--budget", "2m", f"--runs_dir={runs}", f"--data.train=[{corpus}]", "--train.threads=1",
            "--plan.probe_sizes=[[32, 1], [48, 1], [64, 1]]", "--plan.probe_seconds=[3.5, 5]",
            "--plan.probe_warmup=2", "--plan.eval_batches=2", "--plan.confirm_fraction=0.05"]


def test_a_plan_writes_a_recipe_that_loads_its_json_and_its_plot(tmp_path, small_corpus, monkeypatch, capsys):
    _fake_speed(monkeypatch)
    assert call_cli(*_plan_args(tmp_path, small_corpus)) == 0
    folder = tmp_path / "plan-2m"
    text = (folder / "plan.yaml").read_text()
    plan = json.loads((folder / "plan.json").read_text())
    chosen = plan["chosen"]
    assert f"# predicted held-out bits per byte: {chosen['predicted_bpb']:.3f}" in text
    cfg = load_config(folder / "plan.yaml")
    assert cfg.name == "plan-2m" and cfg.runs_dir == str(tmp_path) and cfg.run_dir == folder
    assert cfg.train.steps == "auto" and cfg.train.max_seconds == 120.0 and cfg.train.optimizer == "muon"
    assert (cfg.model.d_model, cfg.model.n_layers) == (chosen["d_model"], chosen["n_layers"])
    assert cfg.tokenizer.vocab_size == 2048 and cfg.data.train == [str(small_corpus)] and cfg.data.split == "tail"
    probes, conf = plan["probes"], plan["confirmations"]
    assert all(p["bpb"] > 0 for p in probes)
    for p in probes:  # steady-state speed: the fake step time, 16 x 128 tokens a step
        assert p["tokens_per_s"] == pytest.approx(16 * 128 / (SECONDS_PER_PARAM * p["params"]), rel=1e-9)
    assert {p["params"] for p in probes[:6]} == {144_544, 224_496, 315_648}
    # Two confirmations of 6 s (5% of 2 minutes): the fit's first choice and the runner-up (the speedrun's 128x4
    # is no candidate with probes this small); a confirmed shape no probe measured is probed at 3.5 and 5 s first
    # (long enough for every candidate: none is skipped as too slow, so a second plan trains nothing).
    confirmed_shapes = {(c["d_model"], c["n_layers"]) for c in conf}
    assert [c["seconds"] for c in conf] == [6.0, 6.0] and len(confirmed_shapes) == 2
    assert all((p["d_model"], p["n_layers"]) in confirmed_shapes and p["seconds"] in (3.5, 5.0) for p in probes[6:])
    assert plan["budget"] == {"text": "2m", "seconds": 120.0} and plan["fit"]["points"] == len(probes) + 2
    assert {(r["d_model"], r["n_layers"]) for r in plan["confirmed"]} == confirmed_shapes
    best = min(r["predicted_bpb"] for r in plan["confirmed"])  # the choice: the smaller one within TIE of the best
    assert chosen["confirmed"] and chosen["predicted_bpb"] <= best + plan_module.TIE
    assert all(r["params"] >= chosen["params"] for r in plan["confirmed"] if r["predicted_bpb"] <= best + plan_module.TIE)
    # Each prediction: at the shape's median speed, its own curve through its runs when they have 3 or more
    # lengths, else the refitted curve at the budget's tokens + its miss at the confirmation.
    fit, unique = LossFit(**plan["fit"]), plan["data"]["train_tokens"]
    for row in plan["confirmed"]:
        shape = (row["d_model"], row["n_layers"])
        c = next(c for c in conf if (c["d_model"], c["n_layers"]) == shape)
        own = [r for r in probes + conf if (r["d_model"], r["n_layers"]) == shape]
        tokens = float(np.median([r["tokens_per_s"] for r in own])) * 120.0 * 0.97
        eff = effective_tokens(tokens, unique)
        miss = c["bpb"] - fit.predict(c["params"], effective_tokens(c["tokens"], unique))
        assert row["tokens"] == pytest.approx(tokens) and row["confirmation_miss"] == pytest.approx(miss)
        assert row["fit_bpb"] == pytest.approx(fit.predict(c["params"], eff) + miss)
        if len({r["tokens"] for r in own}) >= 3:
            curve = fit_shape_curve([(effective_tokens(r["tokens"], unique), r["bpb"]) for r in own], BPB_FLOOR)
            assert row["shape_curve"]["points"] == len(own) and row["predicted_bpb"] == pytest.approx(curve.predict(eff))
        else:
            assert row["shape_curve"] is None and row["predicted_bpb"] == row["fit_bpb"]
    assert any(r["shape_curve"] for r in plan["confirmed"])  # this plan exercises the own-curve prediction
    assert chosen["params"] <= plan_module.EXTRAPOLATE * max(p["params"] for p in plan["probes"])
    assert [c["minutes"] for c in plan["curve"]] == plan_module.CURVE["cpu"]  # 2 minutes is one of them
    assert plan["curve"][1]["predicted_bpb"] == plan_module.choose(plan["candidates"])["predicted_bpb"]  # the fit's
    assert (folder / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "pack" / "manifest.json").is_file()  # the recipe's run finds its data prepared

    # Planning again runs no probe: every one, confirmations included, is cached for this machine and config.
    def no_training(*a, **k):
        raise AssertionError("a cached probe was trained again")

    monkeypatch.setattr(loop, "main", no_training)
    assert call_cli(*_plan_args(tmp_path, small_corpus)) == 0
    assert json.loads((folder / "plan.json").read_text())["chosen"] == chosen
    args = _plan_args(tmp_path, small_corpus)
    args[2] = "5m"
    args[-1] = "--plan.confirm_fraction=0"  # another budget would confirm at its own length: none here
    assert call_cli(*args) == 0
    again = json.loads((tmp_path / "plan-5m" / "plan.json").read_text())
    assert again["probes"] == plan["probes"][:6] and again["budget"]["seconds"] == 300.0 and again["confirmations"] == []
    assert again["fit"]["points"] == 6 and again["chosen"] == plan_module.choose(again["candidates"])
    assert yaml.safe_load((tmp_path / "plan-5m" / "plan.yaml").read_text())["train"]["max_seconds"] == 300.0

    # Two hours on an H100: its datasheet dense bf16 FLOP/s x the assumed MFU; larger models, larger batches.
    args[2:3] = ["2h", "--gpu", "h100"]
    args[-1] = "--plan.confirm_fraction=0.025"  # never on a GPU's budget: nothing here would measure it
    assert call_cli(*args) == 0
    gpu = json.loads((tmp_path / "plan-2h-h100" / "plan.json").read_text())
    assert gpu["confirmations"] == [] and gpu["confirmed"] == []
    assert gpu["gpu_flops"] == pytest.approx(989e12 * 0.4) and gpu["target"] == "gpu:h100"
    assert gpu["chosen"]["tokens_per_s"] == pytest.approx(989e12 * 0.4 / gpu["chosen"]["flops_per_token"])
    gcfg = load_config(tmp_path / "plan-2h-h100" / "plan.yaml")
    assert gcfg.train.max_seconds == 7200.0 and gcfg.train.batch_size > 16
    assert gcfg.train.batch_size * 128 * plan_module.MAX_STEPS >= gpu["chosen"]["tokens"] or gcfg.train.batch_size == 16 * 256
    assert gpu["epochs"] > 1000 and "read the corpus" in gpu["notes"][0]  # the test corpus is tiny for 2 hours
    capsys.readouterr()

    # A budget that buys fewer steps than warmup + 10: a one-line error naming --budget, no recipe written.
    args[2:5] = ["1s"]
    assert call_cli(*args) == 2
    # The data stages log their progress first; the error is the last line, and the only one.
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert sum(line.startswith("error:") or "Traceback" in line for line in lines) == 1
    assert err.startswith("error: --budget: 1s buys about") and "\n" not in err
    assert not (tmp_path / "plan-1s" / "plan.yaml").exists()


def test_plan_help_explains_every_option():
    from lmforge.cli import verb_help
    from lmforge.config import PlanConfig

    text = verb_help("plan")
    assert "--budget TIME" in text and "--gpu NAME" in text and "90s, 5m, 2h" in text
    for name, field in PlanConfig.model_fields.items():
        assert f"--plan.{name}=" in text and field.description.split(";")[0][:40] in text, name


def test_probes_too_slow_for_their_time_are_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A shape too slow to train in its probe time is skipped (a busy machine); too few left for the fit stop the plan."""
    data = {"fingerprint": "x", "train_tokens": 10**6, "bytes_per_token": 2.7, "vocab_size": 2048}
    monkeypatch.setattr(plan_module, "_prepare", lambda cfg, folder: data)
    monkeypatch.setattr(plan_module, "_probe", lambda *a: None)
    assert call_cli("plan", "--budget", "5m", f"--runs_dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: plan.probe_seconds: only 0 probes could train") and "\n" not in err
    assert not list(tmp_path.rglob("plan.yaml"))


def test_a_shape_s_speed_is_the_median_of_its_runs_so_one_slowed_run_does_not_set_it():
    runs = [{"d_model": 128, "n_layers": 4, "tokens_per_s": t} for t in (13_475.0, 11_814.0, 13_164.0, 6_233.0)]
    runs.append({"d_model": 64, "n_layers": 2, "tokens_per_s": 40_000.0})
    assert plan_module.shape_speed(runs, 128, 4) == pytest.approx((11_814.0 + 13_164.0) / 2)
    assert plan_module.shape_speed(runs, 64, 2) == 40_000.0


def test_a_shape_s_own_curve_recovers_a_saturating_shape_and_needs_three_lengths():
    """Points on E + B / (D/1e6)^b with a small model's early saturation (E 1.9, b 0.45) come back as that curve,
    so its prediction far past the points is the truth's (the shared additive fit cannot bend per shape)."""
    truth = ShapeCurve(E=1.9, B=0.3, b=0.45)
    points = [(d, truth.predict(d)) for d in (4e5, 1.1e6, 1.8e6, 3.0e6)]
    curve = fit_shape_curve(points, min_e=BPB_FLOOR)
    assert (curve.E, curve.B, curve.b) == pytest.approx((1.9, 0.3, 0.45), rel=1e-4) and curve.points == 4
    assert curve.predict(1.2e7) == pytest.approx(truth.predict(1.2e7), abs=1e-4)
    floor = fit_shape_curve([(d, 0.5 + 2.0 * (d / 1e6) ** -0.3) for d in (1e5, 3e5, 9e5)], min_e=BPB_FLOOR)
    assert pytest.approx(BPB_FLOOR) == floor.E  # an irreducible loss below the floor is held at the floor
    with pytest.raises(ConfigError, match="3 or more lengths"):
        fit_shape_curve([(1e5, 2.5), (1e5, 2.4), (3e5, 2.3)])
