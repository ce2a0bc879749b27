"""benchmarks/fps.py runs end to end (tiny model, tiny input) and writes the JSON it promises."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _fps_module():
    spec = importlib.util.spec_from_file_location("fps", os.path.join(ROOT, "benchmarks", "fps.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fps_script_writes_json(tmp_path, capsys):
    out = tmp_path / "fps.json"
    rc = _fps_module().main(["--model", "armnet_tiny", "--resolution", "32", "40", "--warmup", "1",
                             "--iters", "2", "--ops-backend", "both", "--device", "cpu",
                             "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reference" in printed and "fps" in printed
    rep = json.loads(out.read_text())
    assert rep["options"]["resolution"] == [32, 40] and rep["options"]["dtype"] == "float32"
    assert {r["ops_backend"] for r in rep["runs"]} == {"auto", "reference"}
    assert all(len(r["times_s"]) == 2 and r["fps"] > 0 for r in rep["runs"])
    env = rep["environment"]
    assert env["torch"] and env["python"] and "triton" in env and env["commit"]
    assert env["date"] and env["device"] and "speedup_auto_over_reference" in rep
    assert rep["runs"][1]["resolved"]["carafe_fused"] == "reference"


def test_fps_cuda_graphs_needs_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(SystemExit, match="CUDA"):
        _fps_module().main(["--model", "armnet_tiny", "--resolution", "32", "32", "--iters", "1",
                            "--device", "cpu", "--cuda-graphs", "--no-json"])
