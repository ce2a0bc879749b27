"""`python -m armnet` end to end on tiny inputs: train 1 step, eval, predict, synth; bad input."""
import json
import os
import subprocess
import sys
import types

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


class _Logits(torch.nn.Module):
    """A stand-in segmentation model: a fixed 3×3 conv, so that each scale gives other logits."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        torch.manual_seed(0)
        torch.nn.init.normal_(self.conv.weight)

    def forward(self, x):
        return {"logits": self.conv(x)}


def test_predict_probs_averages_the_softmax_over_scales():
    import torch.nn.functional as F
    from armnet.evaluate import predict_probs
    model, x = _Logits(), torch.randn(2, 3, 20, 24)
    one = predict_probs(model, x)
    assert torch.allclose(one, torch.softmax(model(x)["logits"], 1))
    up = F.interpolate(model(F.interpolate(x, size=(30, 36), mode="bilinear"))["logits"],
                       size=(20, 24), mode="bilinear")
    want = (torch.softmax(model(x)["logits"], 1) + torch.softmax(up, 1)) / 2
    two = predict_probs(model, x, scales=(1.0, 1.5))
    assert two.shape == (2, 2, 20, 24) and torch.allclose(two, want, atol=1e-6)
    assert not torch.allclose(two, one, atol=1e-3)      # the second scale did contribute
    big = predict_probs(model, x, size=(40, 48))
    want = torch.softmax(F.interpolate(model(x)["logits"], size=(40, 48), mode="bilinear"), 1)
    assert torch.allclose(big, want, atol=1e-6)
    for bad in ([], [0.0], [1.0, -1.0], [float("nan")]):
        with pytest.raises(ValueError, match="scales must be"):
            predict_probs(model, x, scales=bad)


def test_eval_with_test_scales(checkpoint, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(checkpoint), *SYN, "--synth-n", "2", "--batch-size",
                 "2", "--scales", "1", "1.25", "--out-json", str(out_json), "--quiet"]) == 0
    assert "test scales 1, 1.25" in capsys.readouterr().out
    rep = json.loads(out_json.read_text())
    assert rep["scales"] == [1.0, 1.25] and rep["metrics"]["images"] == 2
    assert main(["eval", "--checkpoint", str(checkpoint), *SYN, "--synth-n", "1",
                 "--scales", "0", "--quiet"]) == 2
    assert "scales must be one or more finite factors > 0, got [0.0]" in capsys.readouterr().err


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
    for extra in ([], ["--scales", "0.75", "1.25", "--max-side", "40"]):
        assert main(["predict", str(img), "--checkpoint", str(checkpoint), "--out", str(out),
                     *extra]) == 0
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


# ---- test protocols and small flags ---------------------------------------------------------------

def test_texrnet_sizes_follow_its_eval_config():
    from armnet.evaluate import TEXRNET_SIDES, texrnet_test_sizes
    # TexRNet eval_utils.py: int(512 * f) + 1 for f = 0.75 ... 2.50
    assert TEXRNET_SIDES == (385, 513, 641, 769, 897, 1025, 1153, 1281)
    # a 480x640 image: ratio = 385 / sqrt(480 * 640) = 0.6945; int(333.4) = 333 -> 321,
    # int(444.5) = 444 -> 417 (floored to a multiple of 32, plus 1)
    sizes = texrnet_test_sizes(480, 640)
    assert sizes[0] == (321, 417)
    assert sizes[1] == (417, 577)          # 513: 443.3 -> 417, 591.1 -> 577
    assert sizes[-1] == (1089, 1473)       # 1281: 1109.4 -> 1089, 1479.2 -> 1473
    assert all((h - 1) % 32 == 0 and (w - 1) % 32 == 0 for h, w in sizes)
    assert texrnet_test_sizes(512, 512)[1] == (513, 513)


def test_texrnet_probs_average_softmax_resized_with_aligned_corners():
    import torch.nn.functional as F
    from armnet.evaluate import texrnet_probs, texrnet_test_sizes
    model, x = _Logits(), torch.randn(1, 3, 30, 40)
    want = 0
    for hw in texrnet_test_sizes(30, 40):
        xi = F.interpolate(x, size=hw, mode="bilinear", align_corners=True)
        p = torch.softmax(model(xi)["logits"], 1)            # softmax first, then resize
        want = want + F.interpolate(p, size=(30, 40), mode="bilinear", align_corners=True)
    got = texrnet_probs(model, x)
    assert got.shape == (1, 2, 30, 40) and torch.allclose(got, want / 8, atol=1e-5)
    # not the logit-first order of --scales
    logit_first = 0
    for hw in texrnet_test_sizes(30, 40):
        xi = F.interpolate(x, size=hw, mode="bilinear", align_corners=True)
        lg = F.interpolate(model(xi)["logits"], size=(30, 40), mode="bilinear", align_corners=True)
        logit_first = logit_first + torch.softmax(lg, 1)
    assert not torch.allclose(got, logit_first / 8, atol=1e-4)


def test_eval_protocol_texrnet_max_side_and_held_out_seed(checkpoint, tmp_path, capsys):
    out_json = tmp_path / "t.json"
    assert main(["eval", "--checkpoint", str(checkpoint), *SYN, "--synth-n", "1",
                 "--protocol", "texrnet", "--out-json", str(out_json), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "TexRNet protocol" in printed and "seed 12345" in printed and "mIoU" in printed
    rep = json.loads(out_json.read_text())
    assert rep["protocol"]["name"] == "texrnet" and rep["protocol"]["flip"] is False
    assert rep["protocol"]["sides"] == [385, 513, 641, 769, 897, 1025, 1153, 1281]
    assert "TexRNet" in rep["protocol"]["comparable_with"]
    assert rep["dataset"]["synth_seed"] == 12345          # not training's default seed 0
    assert main(["eval", "--checkpoint", str(checkpoint), *SYN, "--synth-n", "1", "--quiet",
                 "--protocol", "texrnet", "--scales", "1", "1.5"]) == 2
    assert "cannot be combined with --protocol texrnet" in capsys.readouterr().err
    # --max-side: the image is run smaller, the metrics stay at the label's size
    assert main(["eval", "--checkpoint", str(checkpoint), *SYN, "--synth-n", "1", "--max-side",
                 "24", "--out-json", str(out_json), "--quiet"]) == 0
    rep = json.loads(out_json.read_text())
    assert rep["max_side"] == 24 and rep["protocol"]["name"] == "scales"
    assert rep["metrics"]["tp"] + rep["metrics"]["fp"] + rep["metrics"]["fn"] + \
        rep["metrics"]["tn"] == 48 * 48
    assert "longer side <= 24" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(checkpoint), *SYN, "--synth-n", "1", "--max-side",
                 "-1", "--quiet"]) == 2
    assert "max_side must be >= 0 (0: no limit), got -1" in capsys.readouterr().err
    # evaluating on the seed the checkpoint was trained on says so
    assert main(["eval", "--checkpoint", str(checkpoint), *SYN, "--synth-n", "1",
                 "--synth-seed", "0", "--quiet"]) == 0
    assert "not held out" in capsys.readouterr().err


def test_limit_side_and_max_side_changes_the_input(monkeypatch):
    from armnet import evaluate
    x = torch.randn(1, 3, 30, 60)
    assert evaluate.limit_side(x, 0) is x and evaluate.limit_side(x, 60) is x
    assert evaluate.limit_side(x, 20).shape[-2:] == (10, 20)
    seen = []
    model = _Logits()
    monkeypatch.setattr(model, "forward", lambda im: seen.append(im.shape[-2:]) or
                        {"logits": torch.zeros(im.shape[0], 2, *im.shape[-2:])})
    args = types.SimpleNamespace(max_side=20, protocol="scales", scales=[1.0])
    out = evaluate._probs(args, model, x, None, (30, 60))
    assert seen == [(10, 20)] and out.shape[-2:] == (30, 60)


def test_predict_quiet_prints_nothing(checkpoint, tmp_path, capsys):
    img = tmp_path / "p.png"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["predict", str(img), "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "o"), "--protocol", "texrnet"]) == 0
    assert "% text ->" in capsys.readouterr().out
    assert (tmp_path / "o" / "p_mask.png").exists()
