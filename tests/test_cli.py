"""`python -m armnet` end to end on tiny inputs: train 1 step, eval, predict, synth; bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from armnet.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = ["--dataset", "synthetic", "--synth-size", "48", "48"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--model", "armnet_tiny", *SYN, "--synth-n", "4", "--crop-size", "48", "48",
               "--batch-size", "2", "--epochs", "1", "--max-steps", "1", "--out", str(out),
               "--quiet", "--lr", "1e-3"])
    assert rc == 0
    return out / "last.pt"


def test_train_writes_checkpoint_and_log(checkpoint):
    ckpt = torch.load(checkpoint, weights_only=False)
    assert ckpt["format"] == "armnet-checkpoint" and ckpt["iteration"] == 1
    log = json.loads((checkpoint.parent / "train_log.json").read_text())
    assert log["summary"]["steps"] == 1 and np.isfinite(log["history"][0]["loss"])


def test_eval_prints_table_and_writes_json(checkpoint, tmp_path, capsys):
    out_json = tmp_path / "m" / "eval.json"
    rc = main(["eval", "--checkpoint", str(checkpoint), *SYN, "--synth-n", "3", "--synth-seed", "77",
               "--batch-size", "2", "--out-json", str(out_json), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "TexRNet-style" in printed and "fgIoU" in printed
    rep = json.loads(out_json.read_text())
    assert rep["metrics"]["images"] == 3 and rep["model"] == "armnet_tiny"
    assert rep["dataset"]["synth_seed"] == 77
    for k in ("P", "R", "F", "dataset_P", "dataset_R", "dataset_F", "fgIoU"):
        assert 0.0 <= rep["metrics"][k] <= 1.0


def test_synth_then_eval_on_textseg_layout(checkpoint, tmp_path):
    root = tmp_path / "syn"
    assert main(["synth", "--out", str(root), "--n", "2", "--size", "40", "44", "--seed", "5"]) == 0
    assert (root / "split.json").exists() and len(os.listdir(root / "image")) == 2
    out_json = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "textseg", "--data-root",
                 str(root), "--split", "test", "--out-json", str(out_json), "--quiet"]) == 0
    assert json.loads(out_json.read_text())["metrics"]["images"] == 2


def test_predict_writes_mask_and_overlay(checkpoint, tmp_path):
    img = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)).save(img)
    out = tmp_path / "pred"
    assert main(["predict", str(img), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    mask = np.asarray(Image.open(out / "photo_mask.png"))
    over = Image.open(out / "photo_overlay.png")
    assert mask.shape == (37, 53) and set(np.unique(mask)) <= {0, 255}
    assert over.size == (53, 37) and over.mode == "RGB"


def test_bad_inputs_give_clear_errors(checkpoint, tmp_path, capsys):
    # missing dataset directory
    assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "totaltext", "--data-root",
                 str(tmp_path / "missing"), "--quiet"]) == 2
    assert "Total-Text root: directory not found" in capsys.readouterr().err
    # corrupt image
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["predict", str(bad), "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "corrupt" in capsys.readouterr().err
    # not a checkpoint at all
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(junk), *SYN, "--synth-n", "1", "--quiet"]) == 2
    assert "cannot read" in capsys.readouterr().err
    # a torch file that is not one of ours (e.g. a bare state dict)
    sd = tmp_path / "sd.pt"
    torch.save({"conv.weight": torch.zeros(1)}, sd)
    assert main(["eval", "--checkpoint", str(sd), *SYN, "--synth-n", "1", "--quiet"]) == 2
    assert "not an ARM-Net checkpoint" in capsys.readouterr().err
    # a checkpoint of another model than --model
    assert main(["predict", str(bad), "--checkpoint", str(checkpoint), "--model", "armnet_r50",
                 "--out", str(tmp_path)]) == 2
    assert "holds a 'armnet_tiny' model" in capsys.readouterr().err
    # weights that do not fit (a checkpoint edited to claim a different architecture)
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["model_kwargs"] = {"use_rem": False}
    wrong = tmp_path / "wrong.pt"
    torch.save(ckpt, wrong)
    assert main(["eval", "--checkpoint", str(wrong), *SYN, "--synth-n", "1", "--quiet"]) == 2
    assert "do not fit the model" in capsys.readouterr().err
    # missing checkpoint file
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), *SYN, "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "armnet", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "train" in proc.stdout and "predict" in proc.stdout
