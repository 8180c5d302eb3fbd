"""The command line: output of `vitlab params`, one-line errors with a non-zero exit, help, version and pipes."""

import argparse
import subprocess
import sys

import pytest

import vitlab
from vitlab import count_parameters
from vitlab.cli import build_parser, main


def test_params_prints_table_1_for_the_given_geometry(capsys):
    assert main(["params", "--image-size", "32", "--patch-size", "4", "--num-classes", "10"]) == 0
    out, convnets = capsys.readouterr().out.split("\n\n")
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip() and not line.startswith("-")}
    assert list(lines) == ["Ti", "S", "B", "L", "H", "g", "G", "22B"]
    rows = {line.split()[0]: line.split()[1:] for line in convnets.splitlines()[2:]}
    assert list(rows) == ["bit-r26x1", "bit-r50x1", "bit-r101x1", "hybrid-r50-vit-b/16", "hybrid-r50-vit22b-b/16", "vit-b/16"]
    assert int(rows["bit-r50x1"][0].replace(",", "")) == count_parameters("bit-r50x1", num_classes=10)
    small = lines["S"].split()
    assert int(small[5].replace(",", "")) == count_parameters("vit-s/4", img_size=32, num_classes=10)
    assert int(small[6].replace(",", "")) == count_parameters("vit22b-s/4", img_size=32, num_classes=10)


def test_bad_input_is_one_line_on_stderr_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "vitlab.cli", "params", "--image-size", "30"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not divisible by patch size 16" in proc.stderr
    assert "Traceback" not in proc.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitlab.cli", *args], capture_output=True, text=True)


def test_version_is_printed():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vitlab {vitlab.__version__}"


def test_every_option_with_a_value_shows_its_default_in_the_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps no public list of subparsers
    assert {"predict", "export"} <= set(commands)
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, (name, action.dest)
            elif action.option_strings and action.default is None and action.nargs != 0:
                assert "default" in (action.help or "") or action.required, (name, action.dest)


def test_params_and_plan_share_their_defaults():
    args = {name: build_parser().parse_args([name]) for name in ("params", "plan")}
    for key in ("image_size", "patch_size", "num_classes"):
        assert getattr(args["params"], key) == getattr(args["plan"], key)


@pytest.mark.parametrize("option", [["--patch-size", "0"], ["--image-size", "0"], ["--num-classes", "-1"]])
def test_impossible_geometry_is_a_one_line_error(option):
    proc = run_cli("params", *option)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    # `true` exits without reading, so every write of `vitlab params` meets a closed pipe.
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m vitlab.cli params | true"], capture_output=True, text=True
    )
    assert proc.stderr == "" and proc.returncode == 141


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["translate-eval", "--help"]])
def test_help_and_version_answer_without_importing_torch(args):
    check = (
        "import sys, vitlab.cli\ntry:\n    vitlab.cli.main(sys.argv[1:])\nexcept SystemExit:\n    print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", check, *args], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "False", proc.stderr
