"""A broken config file is a user's mistake: exit 2 and one line naming the file, the line
and the error, no traceback (JAXFORMER_TRACEBACK=1 shows it, for debugging)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jaxformer.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEADER = "from jaxformer.config import base_config\n\n\n"


@pytest.mark.parametrize(
    "body, expected",
    [
        ("def get_config(:\n    return base_config()\n", "does not load: SyntaxError at line 4"),
        (
            "def get_config():\n    raise RuntimeError('no such preset')\n",
            "get_config\\(\\) raised RuntimeError at line 5: no such preset",
        ),
        (
            "import no_such_module_xyz  # noqa\n\ndef get_config():\n    return base_config()\n",
            "does not load: ModuleNotFoundError at line 4: No module named 'no_such_module_xyz'",
        ),
    ],
    ids=["syntax", "raises", "import"],
)
def test_a_broken_config_file_exits_2_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, body, expected
) -> None:
    monkeypatch.delenv("JAXFORMER_TRACEBACK", raising=False)
    path = tmp_path / "broken.py"
    path.write_text(HEADER + body)
    assert main(["train", f"--config={path}"]) == 2
    err = capsys.readouterr().err
    assert f"config file '{path}'" in err
    assert re.search(expected, err), err
    assert "Traceback" not in err


def test_a_preset_argument_the_file_refuses_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", f"--config={ROOT / 'configs/bert.py'}:huge"]) == 2
    assert "get_config() raised ValueError at line" in capsys.readouterr().err


def test_the_traceback_switch_shows_where_it_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JAXFORMER_TRACEBACK", "1")
    path = tmp_path / "broken.py"
    path.write_text(HEADER + "def get_config():\n    raise RuntimeError('boom')\n")
    assert main(["train", f"--config={path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err and "config error:" in err
