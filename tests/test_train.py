"""End to end: the README's main job, exact resume, evaluation and the stored run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLI

from jaxformer import cli
from jaxformer import data as jdata
from jaxformer.config import load_config
from jaxformer.train.checkpoint import Checkpointer
from jaxformer.train.logs import read_metrics
from jaxformer.train.loop import train

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    *TINY_CLI,
    "--config.model.dropout=0.1",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=3",
]


def tiny_config(run_dir: Path, steps: int, *extra: str):
    overrides = [*TINY, f"--config.train.run_dir={run_dir}", f"--config.train.steps={steps}"]
    return load_config(str(ROOT / "configs/default.py"), [*overrides, *extra])


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def test_resume_matches_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tiny_config(straight, 6))

    interrupted = tmp_path / "interrupted"
    train(tiny_config(interrupted, 3))  # stops after step 3, as a preempted job would
    ckpt = Checkpointer(interrupted / "checkpoints", keep=3, every=3, use_async=False)
    assert ckpt.latest_step() == 3
    train(tiny_config(interrupted, 6))  # same directory: resumes without flags

    expected, resumed = train_losses(straight), train_losses(interrupted)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]} != {expected[step]}"

    # The data iterator continues where it stopped: the state saved at step 3 yields the
    # 4th batch of a fresh iterator, no batch repeated or skipped.
    cfg = tiny_config(interrupted, 6)
    data_state = ckpt.manager.restore(3, args=_data_only())["data"]

    def dataset():
        return jdata.make_dataset(
            cfg.data,
            split=cfg.data.train_split,
            seq_len=cfg.data.seq_len,
            global_batch=cfg.train.global_batch,
            process_index=0,
            process_count=1,
            seed=cfg.data.shuffle_seed,
            repeat=True,
        )

    fresh = iter(dataset())
    batches = [next(fresh) for _ in range(4)]
    restored = iter(dataset())
    restored.set_state(data_state)
    following = next(restored)
    for key in following:
        np.testing.assert_array_equal(following[key], batches[3][key])


def _data_only():
    import orbax.checkpoint as ocp

    return ocp.args.Composite(data=ocp.args.JsonRestore())


def test_eval_command_reads_latest_checkpoint(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, 3))
    argv = [
        "eval",
        f"--config={ROOT / 'configs/default.py'}",
        *TINY,
        f"--config.train.run_dir={run_dir}",
        "--batches=2",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "step 3 eval: loss" in out and "bits_per_byte" in out


def test_eval_without_checkpoint_names_run_dir(tmp_path: Path, capsys) -> None:
    argv = [
        "eval",
        f"--config={ROOT / 'configs/default.py'}",
        f"--config.train.run_dir={tmp_path / 'empty'}",
    ]
    assert cli.main(argv) == 2
    assert "train.run_dir" in capsys.readouterr().err


def test_missing_dataset_stops_before_compiling_and_names_the_key(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    argv = [
        "train",
        f"--config={ROOT / 'configs/default.py'}",
        *TINY,
        f"--config.train.run_dir={run_dir}",
        "--config.data.name=tfds",
        "--config.data.tfds_name=lm1b",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data error" in err and "'lm1b'" in err and "data.data_dir" in err
    assert not (run_dir / "checkpoints").exists()


def test_tokenizer_larger_than_model_vocab_is_rejected(tmp_path: Path) -> None:
    from jaxformer.config import ConfigError

    with pytest.raises(ConfigError, match="model.vocab_size"):
        train(tiny_config(tmp_path, 1, "--config.model.vocab_size=128"))


@pytest.mark.slow
def test_readme_main_command_halves_held_out_loss(tmp_path: Path) -> None:
    """The README's first command, as a user runs it: one process, one CPU device."""
    readme = (ROOT / "README.md").read_text()
    assert "jaxformer train --config=configs/default.py\n" in readme
    run_dir = tmp_path / "default"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxformer.cli",
            "train",
            "--config=configs/default.py",
            f"--config.train.run_dir={run_dir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = read_metrics(run_dir, "eval")
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == load_config("configs/default.py").train.steps
    assert last["loss"] <= first["loss"] / 2, (first["loss"], last["loss"])
    assert (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["model"]["d_model"] == 128
    assert "batch" in json.loads((run_dir / "run_info.json").read_text())


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert blocks[0].endswith("jaxformer train --config=configs/default.py")
    assert blocks[1] in (ROOT / ".ci/run").read_text()
