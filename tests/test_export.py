"""`python -m armnet export` (ONNX and AOTInductor), `predict --onnx` with torch blocked, the
errors for bad input, and `benchmarks/fps.py --engine`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from armnet.checkpoint import save_checkpoint
from armnet.cli import main
from armnet.model import armnet_tiny

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """armnet_tiny with random weights and every gamma non-zero, as `train` writes it."""
    torch.manual_seed(0)
    model = armnet_tiny()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(str(path), model, "armnet_tiny", {})
    return path


@pytest.fixture(scope="module")
def onnx_model(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    rc = main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out),
               "--dynamic", "--size", "40", "48"])
    assert rc == 0
    return out


def test_export_onnx_checks_and_reports(onnx_model, capsys):
    model = onnx.load(str(onnx_model))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1), "batch, H, W must be symbolic"


def test_onnx_logits_match_eager(onnx_model, checkpoint):
    """The exported armnet_tiny (dynamic shapes, traced at 40x48) against eager in fp32 at three
    sizes, one not a multiple of 8 and one smaller than the trace: logits within 1e-4."""
    import onnxruntime as ort
    from armnet.checkpoint import load_model
    from armnet.export import LogitsOnly
    model = LogitsOnly(load_model(str(checkpoint))[0].eval())
    sess = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 64), (2, 3, 48, 80), (1, 3, 37, 21)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = sess.run(None, {"image": x.numpy()})
        assert got.shape == ref.shape
        err = np.abs(got - ref).max()
        assert err <= 1e-4, f"logits at {shape}: max |onnx - eager| = {err:.3e}"


def test_predict_onnx_without_torch_matches_predict(onnx_model, checkpoint, tmp_path):
    """`python -m armnet predict --onnx` in a process where torch cannot be imported writes the
    masks that `predict --checkpoint` writes (not a multiple of 8, and two scales)."""
    rng = np.random.default_rng(0)
    img = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (37, 45, 3), dtype=np.uint8)).save(img)
    args = [str(img), "--scales", "1", "1.25"]
    code = ("import sys; sys.modules['torch'] = None\n"
            "from armnet.cli import main\n"
            f"rc = main(['predict', '--onnx', {str(onnx_model)!r}, '--out', {str(tmp_path / 'ort')!r}, "
            f"*{args!r}])\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "pt"), *args]) == 0
    got = np.asarray(Image.open(tmp_path / "ort" / "photo_mask.png"))
    ref = np.asarray(Image.open(tmp_path / "pt" / "photo_mask.png"))
    assert got.shape == ref.shape == (37, 45)
    assert (got == ref).mean() >= 0.999, f"{(got != ref).sum()} pixels differ"
    assert (tmp_path / "ort" / "photo_overlay.png").exists()


def test_export_errors(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    (tmp_path / "folder.onnx").mkdir()
    assert main(["export", "--checkpoint", str(bad), "--format", "onnx", "--out",
                 str(tmp_path / "m.onnx")]) == 2
    assert "cannot read" in capsys.readouterr().err
    for out, what in [(tmp_path / "no" / "such" / "m.onnx", "does not exist"),
                      (tmp_path / "m.pt2", "must end with '.onnx'"),
                      (tmp_path / "folder.onnx", "is a folder")]:
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx",
                     "--out", str(out)]) == 2
        assert what in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(checkpoint), "--format", "tflite", "--out", "m.tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["predict", "--onnx", str(tmp_path / "missing.onnx"), "--out", str(tmp_path),
                 str(bad)]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow  # the AOTInductor compile: 3-6 minutes on a busy 2-core CPU
@pytest.mark.skipif(os.environ.get("ARMNET_TEST_AOTI") != "1", reason=(
    "3-6 minutes of compile on a 2-core CPU, so not in every test run (tests/test_aoti.py covers "
    "the ops' package in about a minute); run it with ARMNET_TEST_AOTI=1"))
def test_export_aoti(checkpoint, tmp_path, capsys):
    """The AOTInductor package at a small fixed size, reloaded and checked by the command (the
    synthetic image is a channels_last tensor, which the package once read as contiguous)."""
    out = tmp_path / "tiny.pt2"
    rc = main(["export", "--checkpoint", str(checkpoint), "--format", "aoti", "--out", str(out),
               "--size", "32", "40"])
    assert rc == 0, capsys.readouterr().err
    assert out.exists() and "checked against eager on synthetic image" in capsys.readouterr().out


def test_fps_engine_records_the_engine(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fps
    out = tmp_path / "fps.json"
    assert fps.main(["--model", "armnet_tiny", "--resolution", "32", "40", "--warmup", "1",
                     "--iters", "1", "--device", "cpu", "--engine", "eager", "onnxruntime",
                     "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["engine"] for r in rep["runs"]] == ["eager", "onnxruntime"]
    assert rep["options"]["engine"] == ["eager", "onnxruntime"]
    assert all(r["median_ms"] > 0 for r in rep["runs"])
