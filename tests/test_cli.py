"""The command line: output of `vitlab params` and one-line errors with a non-zero exit."""

import subprocess
import sys

from vitlab import count_parameters
from vitlab.cli import main


def test_params_prints_table_1_for_the_given_geometry(capsys):
    assert main(["params", "--image-size", "32", "--patch-size", "4", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip() and not line.startswith("-")}
    assert list(lines) == ["Ti", "S", "B", "L", "H", "g", "G", "22B"]
    small = lines["S"].split()
    assert int(small[5].replace(",", "")) == count_parameters("vit-s/4", img_size=32, num_classes=10)
    assert int(small[6].replace(",", "")) == count_parameters("vit22b-s/4", img_size=32, num_classes=10)


def test_bad_input_is_one_line_on_stderr_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "vitlab.cli", "params", "--image-size", "30"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not divisible by patch size 16" in proc.stderr
    assert "Traceback" not in proc.stderr
