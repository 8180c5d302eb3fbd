"""The run scaffold: atomic run directories, the lock, checkpoint publishing and fallback, the CSV log."""

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from vitlab import VitlabError
from vitlab.runs import checkpoint as ckpt
from vitlab.train.run_log import CsvLog, read_csv
from vitlab.train.scaffold import RunLock, new_run_dir


def test_runs_started_together_get_distinct_directories(tmp_path):
    barrier, chosen = threading.Barrier(8), []

    def start():
        barrier.wait()
        chosen.append(new_run_dir(tmp_path, "run"))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(chosen)) == 8 and all(p.is_dir() for p in chosen)


def test_a_locked_run_refuses_a_second_process(tmp_path):
    lock = RunLock(tmp_path)
    with pytest.raises(VitlabError, match=f"{tmp_path} is in use by process {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()  # free again once released


def save(run_dir: Path, step: int, value: float, keep: int = 2) -> Path:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, value)
    return ckpt.save_checkpoint(run_dir, step, model, torch.optim.SGD(model.parameters(), lr=0.1), {"v": value}, keep=keep)


def test_re_saving_a_step_never_leaves_latest_pointing_at_nothing(tmp_path, monkeypatch):
    save(tmp_path, 5, 1.0)
    real_replace = os.replace

    def killed_at_rename(src, dst):  # a kill at any rename of the second save
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed_at_rename)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 5, 1.0)
    monkeypatch.setattr(os, "replace", real_replace)
    found = ckpt.find_checkpoint(tmp_path)
    assert found.name == "step-00000005" and ckpt.read_meta(found)["v"] == 1.0
    assert (found / "model.safetensors").is_file()
    # Saved again (the final save of a run whose last periodic checkpoint is that step): the metadata is refreshed.
    save(tmp_path, 5, 1.0)
    assert ckpt.read_meta(ckpt.find_checkpoint(tmp_path))["step"] == 5


def test_find_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    save(tmp_path, 1, 1.0, keep=5)
    save(tmp_path, 2, 2.0, keep=5)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009")  # names a folder that is not there
    (tmp_path / "checkpoints" / "step-00000003").mkdir()  # incomplete: no meta.json
    assert ckpt.find_checkpoint(tmp_path).name == "step-00000002"


def test_damaged_checkpoint_files_name_the_previous_intact_checkpoint(tmp_path):
    first = save(tmp_path, 1, 1.0)
    second = save(tmp_path, 2, 2.0)
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    model = torch.nn.Linear(2, 2)
    with pytest.raises(VitlabError, match=f"{weights} is damaged .*previous intact checkpoint is {first}"):
        ckpt.load_weights(second, model)
    (second / "meta.json").write_text('{"step": ')
    with pytest.raises(VitlabError, match=f"meta.json cannot be read .*{first}"):
        ckpt.read_meta(second)


def test_a_differently_shaped_model_is_one_sentence(tmp_path):
    checkpoint = save(tmp_path, 1, 1.0)
    with pytest.raises(VitlabError, match="does not fit the model built from the config .*cannot change on resume"):
        ckpt.load_weights(checkpoint, torch.nn.Linear(3, 2))


def test_the_csv_rewrite_on_resume_is_atomic_and_survives_torn_rows(tmp_path, monkeypatch):
    path = tmp_path / "steps.csv"
    log = CsvLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    path.write_text(path.read_text() + "6,0.1")  # a row torn by a kill mid-append
    before = path.read_text()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        CsvLog(path).truncate_after(3)
    assert path.read_text() == before  # the kill during the rewrite lost nothing
    monkeypatch.undo()
    CsvLog(path).truncate_after(3)
    assert read_csv(path)["step"] == [1, 2, 3]


@pytest.mark.parametrize("content", ["", "ste", "step,loss\n1,0.5\n2"])
def test_an_empty_or_torn_csv_starts_afresh(tmp_path, content):
    path = tmp_path / "steps.csv"
    path.write_text(content)
    log = CsvLog(path)
    log.truncate_after(0)
    log.write({"step": 1, "loss": 0.25})
    assert read_csv(path) == {"step": [1.0], "loss": [0.25]}


def test_rotation_keeps_the_newest(tmp_path):
    for step in range(1, 5):
        save(tmp_path, step, float(step), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000004"]
    assert json.loads((tmp_path / "checkpoints" / "step-00000004" / "meta.json").read_text())["v"] == 4.0
