"""`python -m armnet plot`: curves from a training log; matplotlib is optional."""
import json
import sys

import pytest

from armnet.cli import main
from armnet.plot import MPL_HINT, plot_log, running_mean

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
PNG = b"\x89PNG\r\n\x1a\n"


def write_log(run, val=True):
    history = [{"step": i + 1, "loss": 1.0 / (i + 1), "lr": 1e-3 * (1 - i / 30)} for i in range(30)]
    log = {"summary": {"steps": 30}, "args": {}, "history": history,
           "val": [{"step": 10, "F": 0.4}, {"step": 20, "F": 0.6}, {"step": 30, "F": 0.55}]
           if val else []}
    run.mkdir(exist_ok=True)
    (run / "train_log.json").write_text(json.dumps(log))
    return run


def test_running_mean():
    assert running_mean([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert running_mean([3.0], 50) == [3.0]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_log(str(write_log(tmp_path / "run")))
    assert path == str(tmp_path / "run" / "curves.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG
    no_val = plot_log(str(write_log(tmp_path / "plain", val=False) / "train_log.json"),
                      str(tmp_path / "plain.png"))
    assert no_val == str(tmp_path / "plain.png") and (tmp_path / "plain.png").stat().st_size > 0


def test_plot_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_log(tmp_path / "run")
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    assert "c.png" in capsys.readouterr().out


def test_plot_bad_input(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "no training log" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train_log.json").write_text(json.dumps({"history": []}))
    pytest.importorskip("matplotlib")
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "holds no training steps" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    run = write_log(tmp_path / "run")
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_log(str(run))
    assert main(["plot", str(run)]) == 2
    assert MPL_HINT in capsys.readouterr().err


def test_training_writes_curves_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["train", "--model", "armnet_tiny", "--synth-n", "4", "--synth-size", "48", "48",
                 "--crop-size", "48", "48", "--batch-size", "2", "--epochs", "1", "--val-every",
                 "1", "--val-max-images", "2", "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
