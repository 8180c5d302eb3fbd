"""The run scaffold: atomic run directories, the lock, checkpoint publishing and fallback, the CSV log."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from vitlab import VitlabError
from vitlab.runs import checkpoint as ckpt
from vitlab.train import run_log
from vitlab.train.pretrain import plot_pretrain_curves
from vitlab.train.run_log import CsvLog, plot_curves, read_csv
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


def test_the_start_block_comes_before_the_progress_bar_and_tensorboard_holds_config_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tiny = [f"out_dir={tmp_path}", "model.options={depth: 1, embed_dim: 32, num_heads: 2, mlp_dim: 64}", "data.num_train=64"]
    tiny += ["data.num_test=32", "train.batch_size=32", "train.precision=fp32", "train.threads=1", "train.epochs=1"]
    command = [sys.executable, "-m", "vitlab.cli", "train", *(arg for key in tiny for arg in ("--set", key))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stdout (the block) and stderr (the bar) in the order written
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith(f"vitlab train: {tmp_path / 'default'} (new run)\n"), proc.stdout[:300]

    events = EventAccumulator(str(tmp_path / "default" / "tensorboard"))
    events.Reload()
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    model:\n      name: vit22b-ti/8\n" in config  # indented: a code block in TensorBoard's markdown
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["model.name"].string_value == "vit22b-ti/8" and hparams["train.epochs"].number_value == 1
    assert hparams["data.root"].string_value == "None"
    results = json.loads((tmp_path / "default" / "results.json").read_text())
    assert events.Scalars("final/test.acc1")[0].value == pytest.approx(results["test"]["acc1"])


@pytest.mark.parametrize("plot", [plot_curves, plot_pretrain_curves])
def test_curves_of_one_logged_point_draw_a_marker_and_a_short_log_axis_reads_plainly(tmp_path, monkeypatch, plot):
    (tmp_path / "steps.csv").write_text("step,loss,lr\n1,2.3,0.001\n")
    (tmp_path / "epochs.csv").write_text("step,test_acc1,test_loss\n1,0.5,2.2\n")
    drawn = []
    monkeypatch.setattr(run_log, "save_figure", lambda fig, path, axes=(): drawn.append(fig) or path)
    monkeypatch.setattr(sys.modules[plot.__module__], "save_figure", lambda fig, path, axes=(): drawn.append(fig) or path)
    plot(tmp_path)
    (fig,) = drawn
    loss, lr = fig.axes[:2]
    assert loss.lines[0].get_marker() == "o" and lr.lines[0].get_marker() == "o"
    fig.canvas.draw()
    labels = [t.get_text() for t in loss.get_yticklabels() + loss.get_yticklabels(minor=True) if t.get_text()]
    assert labels and not any("10^" in label or "times" in label for label in labels), labels
