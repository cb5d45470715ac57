"""The fxqp command line."""

import subprocess
import sys

import pytest

from fxqp.cli import main


def test_demo_trains_and_prints_the_summary(capsys):
    assert main(["demo", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "fxqp summary: step 8" in out
    assert "conv1.weight" in out and "act_1" in out  # the reused ReLU's second call site
    assert "final training loss" in out


def test_bad_arguments_exit_non_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--steps", "many"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "fxqp.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout
