"""`jaxformer sweep plan`: shapes for a size, runs on budget, specs checked, cluster files."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import yaml

from jaxformer import cli, flops
from jaxformer.config import ConfigError, load_config
from jaxformer.scaling import runner
from jaxformer.scaling.collect import write_csv
from jaxformer.scaling.shapes import ShapeRule, shape_for_params
from jaxformer.scaling.spec import check_spec, load_spec
from jaxformer.scaling.sweep_plan import (
    load_sweep_plan,
    make_sweep_plan,
    sweep_plan_from_spec,
    write_sweep_plan,
)

ROOT = Path(__file__).resolve().parent.parent
MICRO = ROOT / "configs/sweeps/micro.py"


def test_shapes_hit_the_target_size_and_follow_the_rule() -> None:
    model = load_config(str(ROOT / "configs/default.py")).model
    rule = ShapeRule(aspect=64.0, head_dim=64, ffn_ratio=8 / 3, ffn_multiple=64)
    for target in (3e6, 2e7, 1e8, 4e8):
        shape = shape_for_params(target, model, rule, seq_len=256)
        assert abs(math.log(shape.non_embedding_params / target)) <= math.log(1.1), shape
        assert shape.d_model % 64 == 0 and shape.num_heads == shape.d_model // 64
        assert shape.d_ff % 64 == 0 and shape.d_ff >= 8 / 3 * shape.d_model
        assert 0.5 < shape.d_model / shape.num_layers / 64 < 2, shape  # near the aspect rule
        m = model.copy_and_resolve_references()
        for key, value in shape.overrides().items():
            m[key.split(".")[1]] = value
        assert flops.count(m, 256).non_embedding_params == shape.non_embedding_params
    total = shape_for_params(1e8, model, ShapeRule(aspect=64.0, head_dim=64, count="total"), 256)
    assert abs(math.log(total.params / 1e8)) <= math.log(1.1)
    fixed = ShapeRule(head_dim=8, ffn_ratio=2.75, min_layers=2, max_layers=2, count="total")
    widths = [shape_for_params(n, model, fixed, 128) for n in (5e3, 13e3, 25e3, 1e5)]
    assert [(s.num_layers, s.d_model) for s in widths] == [(2, 8), (2, 16), (2, 24), (2, 56)]


def test_isoflop_runs_are_within_10_percent_of_their_budget(tmp_path: Path) -> None:
    plan = sweep_plan_from_spec(MICRO)
    spec = load_spec(MICRO)
    assert len(plan.runs) == len(spec.isoflop.budgets) * spec.isoflop.sizes
    for budget in spec.isoflop.budgets:
        runs = [r for r in plan.runs if r.budget == budget]
        sizes = [r.params for r in runs]
        assert len(runs) >= 3 and sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
        for run in runs:
            # Recount from the config the trainer will actually load.
            cfg = load_config(str(ROOT / plan.base_config), run.overrides)
            count = flops.count(cfg.model, cfg.data.seq_len)
            tokens = cfg.train.steps * cfg.train.global_batch * cfg.data.seq_len
            assert count.train_flops(tokens) == run.flops
            assert abs(run.flops / budget - 1) <= 0.1, run.name
            assert cfg.optimizer.warmup_steps < cfg.train.steps

    out = tmp_path / "plan"
    write_sweep_plan(plan, out)
    assert load_sweep_plan(out).runs == plan.runs
    run = plan.runs[0]
    args = (out / "configs" / f"{run.name}.args").read_text().split()
    stored = json.loads((out / "configs" / f"{run.name}.json").read_text())
    assert (
        json.loads(load_config(str(MICRO.parent.parent / "default.py"), args).to_json()) == stored
    )
    # Planning again into a directory whose runs started is refused if the plan changed.
    (out / "runs" / run.name).mkdir(parents=True)
    write_sweep_plan(plan, out)  # the same plan: fine
    changed = sweep_plan_from_spec(MICRO)
    changed.runs[0].overrides = [*changed.runs[0].overrides, "--config.train.seed=1"]
    with pytest.raises(ConfigError, match=run.name):
        write_sweep_plan(changed, out)


def _spec(**sections) -> ml_collections.ConfigDict:
    spec = ml_collections.ConfigDict(
        {"overrides": ("--config.data.seq_len=64",), "isoflop": {"budgets": (1e12,)}}
    )
    for key, value in sections.items():
        spec[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return spec


def test_bad_specs_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="'rules.global_bach'.*'rules.global_batch'"):
        check_spec(_spec(rules={"global_bach": 8}))
    with pytest.raises(ConfigError, match="'isoflop.sizes'"):
        check_spec(_spec(isoflop={"budgets": (1e12,), "sizes": 2}))
    with pytest.raises(ConfigError, match="no runs"):
        check_spec(_spec(isoflop={"budgets": ()}))
    with pytest.raises(ConfigError, match="'shape.min_layers'"):
        check_spec(_spec(shape={"min_layers": 3, "max_layers": 2}))
    with pytest.raises(ConfigError, match="'shape.count'"):
        check_spec(_spec(shape={"count": "embedding"}))
    with pytest.raises(ConfigError, match="min_steps"):
        make_sweep_plan(check_spec(_spec(isoflop={"budgets": (1e9,)})))
    with pytest.raises(ConfigError, match="unknown config key 'model.d_modell'"):
        make_sweep_plan(check_spec(_spec(overrides=("--config.model.d_modell=64",))))


def test_emitted_slurm_array_and_k8s_indexed_job(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    write_sweep_plan(sweep_plan_from_spec(MICRO), out)
    n = len(load_sweep_plan(out).runs)
    sbatch = runner.emit_slurm(out, parallel=4)
    text = sbatch.read_text()
    assert f"#SBATCH --array=0-{n - 1}%4" in text
    assert f'jaxformer sweep run --plan {out.absolute()} --index "$SLURM_ARRAY_TASK_ID"' in text
    assert "scontrol requeue" in text and "--signal=B:TERM" in text
    subprocess.run(["bash", "-n", str(sbatch)], check=True)
    job = yaml.safe_load(runner.emit_k8s(out, parallel=3).read_text())
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == n and job["spec"]["parallelism"] == 3
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [runner.EXIT_INTERRUPTED]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--plan", "/runs/sweeps/plan", "--index", "$(RUN_INDEX)"]
    with pytest.raises(ConfigError, match="--index 99"):
        runner.select(load_sweep_plan(out), index=99)


def test_cli_plan_then_fit_a_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan"
    assert cli.main(["sweep", "plan", f"--spec={MICRO}", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "c9e11_n" in printed and (out / "plan.json").is_file()
    assert cli.main(["sweep", "plan", f"--spec={tmp_path / 'none.py'}", "--out=x"]) == 2
    assert "does not exist" in capsys.readouterr().err

    # A table as `sweep collect` writes it, from a known law: 3 profiles of 5 sizes.
    rows = []
    for budget in (1e12, 4e12, 1.6e13):
        for n in math.sqrt(budget / 120) * np.logspace(-0.6, 0.6, 5):
            d = budget / (6 * n)
            loss = 1.5 + 300 / n**0.35 + 300 / d**0.3
            rows.append(
                {"name": f"r{len(rows)}", "kind": "isoflop", "budget": budget, "num_layers": 1,
                 "d_model": 8, "params": n, "non_embedding_params": n,
                 "train_flops_per_token": 6 * n, "steps": 1, "tokens": d, "flops": budget,
                 "eval_loss": loss, "eval_loss_smoothed": loss, "train_loss_smoothed": loss,
                 "bits_per_byte": 1.0, "lr": 1e-3, "wall_s": 1.0}
            )  # fmt: skip
    write_csv(rows, tmp_path / "table.csv")
    argv = ["sweep", "fit", f"--table={tmp_path / 'table.csv'}", "--budget=1e14",
            "--bootstrap=5", f"--json={tmp_path / 'fit.json'}"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "approach 3" in printed and "compute-optimal at C = 1e+14" in printed
    fitted = json.loads((tmp_path / "fit.json").read_text())
    assert fitted["law"]["alpha"] == pytest.approx(0.35, abs=0.02)
    assert fitted["approach2"]["alpha"] == pytest.approx(0.3 / 0.65, abs=0.03)
