"""The CLI's edge: user errors and disk errors are one line on stderr and exit 2; bugs keep their traceback."""

import errno

import pytest

from vitlab import cli


def _failing_params(exc: BaseException):
    def cmd_params(args) -> None:
        raise exc

    return cmd_params


@pytest.mark.parametrize(
    "exc,words",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/srv/runs/default"), ["/srv/runs/default", "out_dir"]),
        (OSError(errno.ENOSPC, "No space left on device", "/srv/runs/x/ckpt.pt"), ["ckpt.pt", "disk is full"]),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/runs"), ["/mnt/ro/runs", "read-only"]),
    ],
)
def test_disk_errors_are_one_line_naming_the_path_and_the_fix(monkeypatch, capsys, exc, words):
    monkeypatch.setattr(cli, "cmd_params", _failing_params(exc))
    assert cli.main(["params"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitlab params: error: ") and "Traceback" not in err
    for word in words:
        assert word in err


@pytest.mark.parametrize(
    "exc", [OSError(errno.EACCES, "Permission denied"), FileNotFoundError(2, "No such file", "/x"), KeyError("k")]
)
def test_other_errors_are_not_hidden(monkeypatch, exc):
    monkeypatch.setattr(cli, "cmd_params", _failing_params(exc))
    with pytest.raises(type(exc)):
        cli.main(["params"])


def test_a_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 text" in err


def test_an_alias_bomb_in_set_is_one_short_line(capsys):
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    assert cli.main(["train", "--set", "train.epochs={" + ", ".join(levels) + "}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 300
