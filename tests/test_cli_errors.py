"""HYDRA_FULL_ERROR=1 adds the traceback and changes nothing else: the same `error: ...`
last line and the same exit code, which scripts and sweeps read (2 a user error, 3 a
divergence, 143 a signal, 1 anything unexpected)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitexp.errors import ConfigError, Diverged, Interrupted
from vitexp.training.cli import FORCED, exit_with


def cli_env(full_error: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", FORCED)}
    return {**env, "HYDRA_FULL_ERROR": "1"} if full_error else env


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (ConfigError("model.depth=0 must be > 0"), 2),
        (Diverged("training loss is nan at step 3"), 3),
        (Interrupted("stopped by a signal at step 7"), 143),
        (RuntimeError("something unexpected"), 1),
    ],
    ids=["user", "diverged", "interrupted", "unexpected"],
)
@pytest.mark.parametrize("full_error", [False, True], ids=["plain", "full"])
def test_exit_code_is_the_same_with_full_error(monkeypatch, capsys, err, code, full_error):
    monkeypatch.delenv(FORCED, raising=False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1" if full_error else "0")
    try:
        raise err
    except Exception as raised:  # noqa: BLE001 - raised so that the traceback has frames
        with pytest.raises(SystemExit) as exited:
            exit_with(raised)
    assert exited.value.code == code
    stderr = capsys.readouterr().err
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(err) in last, stderr
    assert ("Traceback (most recent call last)" in stderr) == full_error, stderr


@pytest.mark.parametrize("full_error", [False, True], ids=["plain", "full"])
def test_config_error_from_the_command_line_exits_2_either_way(tmp_path: Path, full_error):
    result = subprocess.run(
        [sys.executable, "-m", "vitexp.train", "model.pool=max", f"output_root={tmp_path}/out"],
        cwd=tmp_path, env=cli_env(full_error), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: model.pool='max' is not one of cls, gap", result.stderr
    assert ("Traceback" in result.stderr) == full_error
    assert len(lines) > 1 if full_error else len(lines) == 1


@pytest.mark.parametrize(
    "args",
    [["model.foo=1"], ["model/pos_embed=relative", "model.pos_embed.placement=every_layer"]],
    ids=["unknown key", "N/A cell"],
)
def test_a_config_error_stops_before_lightning_and_the_data_are_imported(tmp_path, args):
    """A bad value is reported once the config is composed and checked, without the
    seconds that importing Lightning, torchvision and the data path take."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vitexp.train", *args,
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=cli_env(False), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and lines[-1].startswith("error: ")
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time")}
    assert "torch" in imported and "vitexp.config" in imported  # the check itself ran
    heavy = {"lightning", "torchvision", "vitexp.data.datamodule", "vitexp.training.trainer"}
    assert not imported & heavy  # the schema loads only the data's configs (vitexp.data.config)
    assert not (tmp_path / "run").exists()
