"""The root README's one-minute CPU run ("## Try it in a minute (CPU)"), command for command: its
`python -m armnet` lines are read from README.md and run in a temporary folder, so the README
cannot drift from what works."""
import glob
import json
import os
import re
import shlex

import pytest

from armnet.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_commands() -> list[list[str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = re.search(r"^## Try it in a minute \(CPU\)\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Try it in a minute (CPU)' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S).group(1)
    lines = block.replace("\\\n", " ").strip().splitlines()
    commands = [shlex.split(line) for line in lines]
    assert all(c[:3] == ["python", "-m", "armnet"] for c in commands), lines
    return [c[3:] for c in commands]


def test_readme_smoke_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = smoke_commands()
    assert [c[0] for c in commands] == ["train", "eval", "synth", "predict"]
    for argv in commands:
        argv = [a for pattern in argv for a in (sorted(glob.glob(pattern)) if "*" in pattern
                                                 else [pattern])]
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    log = json.loads((tmp_path / "runs/smoke/train_log.json").read_text())
    assert log["summary"]["steps"] == 100 and [v["step"] for v in log["val"]] == [50, 100]
    assert "synthetic/test" in out                         # the eval table
    assert len(glob.glob(str(tmp_path / "runs/smoke/pred/*_overlay.png"))) == 2
    assert len(glob.glob(str(tmp_path / "runs/smoke/pred/*_mask.png"))) == 2
