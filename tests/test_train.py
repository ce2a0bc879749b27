"""Training: schedule, a short synthetic run that lowers the loss, resume, 2-process DDP (gloo),
and the evaluation metrics on hand-worked cases."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from armnet.cli import parser
from armnet.data import SyntheticTextDataset, collate
from armnet.metrics import TextSegMetrics, format_table
from armnet.model import ARMNetLoss, armnet_tiny
import armnet.train as train_module
from armnet.train import lr_at, train

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- metrics ---------------------------------------------------------------------------------------

def t(rows):
    return torch.tensor(rows)


def test_metrics_per_image_mean_vs_dataset_level():
    m = TextSegMetrics()
    # image 1: pred 1 1 0 0 / gt 1 0 1 0  -> tp 1, fp 1, fn 1: P 1/2, R 1/2
    m.update(t([[1, 1, 0, 0]]), t([[1, 0, 1, 0]]))
    # image 2: pred 1 1 1 1 / gt 1 1 1 255 -> tp 3, fp 0 (255 excluded), fn 0: P 1, R 1
    m.update(t([[1, 1, 1, 1]]), t([[1, 1, 1, 255]]))
    r = m.compute()
    assert r["P"] == pytest.approx(0.75) and r["R"] == pytest.approx(0.75)
    assert r["F"] == pytest.approx(0.75)                       # F from the means
    assert (r["tp"], r["fp"], r["fn"]) == (4, 1, 1)
    assert r["dataset_P"] == pytest.approx(0.8) and r["dataset_R"] == pytest.approx(0.8)
    assert r["dataset_F"] == pytest.approx(0.8) and r["fgIoU"] == pytest.approx(4 / 6)


def test_metrics_f_from_means_not_mean_of_f():
    m = TextSegMetrics()
    m.update(t([[1, 0, 0, 0]]), t([[1, 1, 1, 1]]))   # P 1, R 1/4
    m.update(t([[1, 1, 1, 1]]), t([[1, 0, 0, 0]]))   # P 1/4, R 1
    r = m.compute()
    assert r["P"] == pytest.approx(0.625) and r["R"] == pytest.approx(0.625)
    assert r["F"] == pytest.approx(0.625)              # mean of per-image F would be 0.4


def test_metrics_batched_update_equals_per_image():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 2, (3, 5, 6), generator=g)
    gt = torch.randint(0, 2, (3, 5, 6), generator=g)
    gt[0, 0] = 255
    a, b = TextSegMetrics(), TextSegMetrics()
    a.update(pred, gt)
    for i in range(3):
        b.update(pred[i], gt[i])
    assert a.compute() == b.compute()


# ---- schedule ---------------------------------------------------------------------------------------

def test_lr_schedule_warmup_then_poly():
    total, warm, base = 100, 10, 1e-4
    lrs = [lr_at(s, total, warm, base, 0.9) for s in range(total)]
    assert lrs[0] == pytest.approx(base * 0.01)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))
    assert lrs[warm] == pytest.approx(base)
    assert lrs[warm + 45] == pytest.approx(base * 0.5 ** 0.9)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert lr_at(total, total, warm, base) == 0.0
    assert lr_at(0, 10, 0, base) == base
    # with a time budget the decay follows whichever is further along: steps or the clock
    assert lr_at(warm + 10, total, warm, base, 0.9, time_fraction=0.5) == pytest.approx(base * 0.5 ** 0.9)
    assert lr_at(warm + 45, total, warm, base, 0.9, time_fraction=0.1) == pytest.approx(base * 0.5 ** 0.9)
    assert lr_at(warm + 1, total, warm, base, 0.9, time_fraction=1.0) == 0.0


# ---- training ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_short_synthetic_training_lowers_the_loss():
    torch.manual_seed(0)
    ds = SyntheticTextDataset(4, seed=3, size=(48, 48))
    batch = collate([ds[i] for i in range(4)])
    model = armnet_tiny()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    crit = ARMNetLoss()
    losses = []
    for _ in range(10):
        loss, _ = crit(model(batch["image"], batch["rem_target"]), batch["mask"], batch["rem_target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses


def _train_args(out, *extra):
    return parser().parse_args([
        "train", "--model", "armnet_tiny", "--dataset", "synthetic", "--synth-n", "8",
        "--synth-size", "48", "48", "--crop-size", "48", "48", "--batch-size", "4",
        "--epochs", "3", "--warmup-epochs", "1", "--out", str(out), "--quiet", "--split", "train",
        *extra])


def test_time_limit_stops_and_checkpoints(tmp_path):
    # a budget already spent after the first step: one step, then a checkpoint
    summary = train(_train_args(tmp_path, "--time-limit", "1e-9", "--text-weight", "3"))
    assert summary["steps"] == 1
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["iteration"] == 1 and ckpt["epoch"] == 0
    assert ckpt["args"]["text_weight"] == 3.0


def test_time_limit_anneals_the_learning_rate(tmp_path, monkeypatch):
    # A fake clock that advances one second per reading: a 4-second budget is spent after 4 steps,
    # and the learning rate follows the clock down (the epochs alone would allow 6 steps).
    clock = iter(range(1000))
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    summary = train(_train_args(tmp_path, "--time-limit", "4", "--warmup-epochs", "0",
                                "--lr", "1e-3"))
    assert summary["steps"] == 4
    lrs = [h["lr"] for h in json.loads((tmp_path / "train_log.json").read_text())["history"]]
    expected = [1e-3 * (1 - used) ** 0.9 for used in (0.0, 0.25, 0.5, 0.75)]
    assert lrs == pytest.approx(expected)


@pytest.mark.slow
def test_checkpoint_and_resume(tmp_path):
    first = train(_train_args(tmp_path, "--max-steps", "2"))
    assert first["steps"] == 2
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["iteration"] == 2 and ckpt["epoch"] == 1 and ckpt["model_name"] == "armnet_tiny"
    second = train(_train_args(tmp_path, "--resume", "auto"))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 3 and ckpt["iteration"] == 2 + 4   # epochs 2 and 3, 2 steps each
    assert second["steps"] == 6
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [3, 4, 5, 6]
    # resuming a different model is refused
    args = _train_args(tmp_path, "--resume", str(tmp_path / "last.pt"))
    args.model = "armnet_r50"
    with pytest.raises(RuntimeError, match="armnet_tiny"):
        train(args)


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "armnet", "train", "--model", "armnet_tiny", "--dataset", "synthetic",
           "--synth-n", "8", "--synth-size", "48", "48", "--crop-size", "48", "48",
           "--batch-size", "2", "--epochs", "1", "--max-steps", "2", "--device", "cpu",
           "--out", str(tmp_path), "--quiet", "--val-every", "1", "--val-max-images", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["summary"]["world_size"] == 2 and log["summary"]["steps"] == 2
    assert [v["step"] for v in log["val"]] == [1, 2]      # rank 0 validates, rank 1 waits
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in ckpt["model"])   # saved unwrapped


# ---- progressive resizing and the loader ------------------------------------------------------

def test_crop_for_switches_at_the_given_fraction():
    assert train_module.crop_for(0.0, (96, 96), (64, 64), 0.6) == (64, 64)
    assert train_module.crop_for(0.59, (96, 96), (64, 64), 0.6) == (64, 64)
    assert train_module.crop_for(0.6, (96, 96), (64, 64), 0.6) == (96, 96)
    assert train_module.crop_for(0.0, (96, 96), None, 0.6) == (96, 96)


def test_small_crop_trains_on_small_then_full_crops(tmp_path, monkeypatch):
    shapes = []

    def recording_collate(items):
        batch = collate(items)
        shapes.append(tuple(batch["image"].shape[-2:]))
        return batch

    monkeypatch.setattr(train_module, "collate", recording_collate)
    # 3 epochs of 2 steps; epochs start at progress 0, 1/3, 2/3: the first two are below 0.5
    train(_train_args(tmp_path, "--small-crop", "32", "32", "--small-crop-until", "0.5"))
    assert shapes == [(32, 32)] * 4 + [(48, 48)] * 2


@pytest.mark.parametrize("flag, value, match", [
    ("--small-crop", ["0", "32"], "--small-crop must be two sizes > 0"),
    ("--small-crop-until", ["1.5"], r"--small-crop-until must be in \[0, 1\], got 1.5"),
])
def test_small_crop_bad_values_are_refused(tmp_path, flag, value, match):
    extra = [flag, *value] + (["--small-crop", "32", "32"] if flag != "--small-crop" else [])
    with pytest.raises(ValueError, match=match):
        train(_train_args(tmp_path, *extra))


class _EpochEcho(torch.utils.data.Dataset):
    """Returns the epoch it was told, as the augmentation seed would see it in a worker."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 2

    def __getitem__(self, i):
        t = torch.full((1,), float(self.epoch))
        return {"image": t, "mask": t, "rem_target": t, "id": i}


def test_loader_workers_see_each_epoch():
    ds = _EpochEcho()
    loader = train_module.make_loader(ds, 2, None, workers=1, drop_last=False, pin_memory=False)
    seen = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        seen += [int(v) for batch in loader for v in batch["image"].flatten()]
    assert seen == [0, 0, 1, 1]


# ---- validation during training, teacher forcing, CPU notices ---------------------------------------

def test_val_every_scores_with_eval_and_keeps_the_best(tmp_path, capsys):
    """6 steps, --val-every 4: validation at step 4 and after the last step (6), on 4 images
    rendered with seed --synth-seed + 1; best.pt is the checkpoint with the highest F, and the
    `eval` command on it reproduces the logged scores."""
    summary = train(_train_args(tmp_path, "--val-every", "4", "--val-max-images", "4",
                                "--lr", "2e-3"))
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [v["step"] for v in log["val"]] == [4, 6]
    assert all(v["images"] == 4 and 0 <= v["F"] <= 1 for v in log["val"])
    best = max(log["val"], key=lambda v: v["F"])          # the first of equals
    assert summary["best"]["step"] == best["step"] and summary["best"]["F"] == best["F"]
    ckpt = torch.load(tmp_path / "best.pt", weights_only=False)
    assert ckpt["iteration"] == best["step"]
    assert not (tmp_path / "val.pt").exists()
    from armnet.cli import main
    out_json = tmp_path / "again.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--dataset", "synthetic",
                 "--synth-n", "4", "--synth-seed", "1", "--synth-size", "48", "48",
                 "--out-json", str(out_json), "--quiet"]) == 0
    again = json.loads(out_json.read_text())["metrics"]
    assert again["F"] == pytest.approx(best["F"]) and again["P"] == pytest.approx(best["P"])


def test_val_every_keeps_the_checkpoint_with_the_highest_f(tmp_path, monkeypatch):
    import armnet.evaluate as evaluate_module
    scores = iter([0.2, 0.5, 0.3])
    seen = []

    def fake_evaluate(eval_args):
        seen.append(eval_args)
        return {"metrics": {"F": next(scores), "P": 0.0, "R": 0.0, "images": 1}}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    summary = train(_train_args(tmp_path, "--val-every", "2", "--val-synth-seed", "77"))
    assert summary["best"]["F"] == 0.5 and summary["best"]["step"] == 4
    assert torch.load(tmp_path / "best.pt", weights_only=False)["iteration"] == 4
    assert [a.synth_seed for a in seen] == [77] * 3 and seen[0].synth_n == 100
    assert seen[0].checkpoint == str(tmp_path / "val.pt") and seen[0].dataset == "synthetic"


def test_validation_args_for_a_real_dataset(tmp_path):
    args = _train_args(tmp_path, "--val-every", "10")
    args.dataset, args.data_root = "textseg", "/data/TextSeg"
    ev = train_module.validation_args(args, "x.pt")
    assert (ev.dataset, ev.data_root, ev.split, ev.checkpoint) == ("textseg", "/data/TextSeg",
                                                                   "val", "x.pt")
    args.val_split, args.val_max_images = "test", 7
    ev = train_module.validation_args(args, "x.pt")
    assert ev.split == "test" and ev.max_images == 7


def test_val_every_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="--val-every must be >= 0.*-1"):
        train(_train_args(tmp_path, "--val-every", "-1"))


def test_rem_teacher_forcing_flag_reaches_the_model(tmp_path):
    from armnet.checkpoint import load_model
    train(_train_args(tmp_path, "--max-steps", "1", "--rem-teacher-forcing"))
    model, ckpt = load_model(str(tmp_path / "last.pt"))
    assert ckpt["model_kwargs"]["rem_teacher_forcing"] is True and model.rem.teacher_forcing
    plain = train_module.model_kwargs_from_args(_train_args(tmp_path))
    assert not plain.get("rem_teacher_forcing", False)


def test_dpd_channel_gain_flag_reaches_the_model(tmp_path):
    from armnet.checkpoint import load_model
    train(_train_args(tmp_path, "--max-steps", "1", "--dpd-channel-gain"))
    model, ckpt = load_model(str(tmp_path / "last.pt"))
    assert ckpt["model_kwargs"]["dpd_channel_gain"] is True
    gains = [m.channel_gain for m in model.modules() if hasattr(m, "channel_gain")]
    assert gains and all(gains)
    assert "dpd_channel_gain" not in train_module.model_kwargs_from_args(_train_args(tmp_path))


def test_teacher_forcing_makes_training_depend_on_the_target():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 40, 40)
    a, b = torch.zeros(1, 1, 40, 40), torch.zeros(1, 1, 40, 40)
    b[..., 8:24, :] = 1.0
    for forcing in (False, True):
        model = armnet_tiny(rem_teacher_forcing=forcing).train()
        model.rem.gamma.data.fill_(1.0)
        same = torch.allclose(model(x, a)["logits"], model(x, b)["logits"])
        assert same != forcing


def test_setup_notices_on_cpu_and_for_r50_without_weights(tmp_path):
    args = _train_args(tmp_path)
    notes = train_module.setup_notices(args, torch.device("cpu"))
    assert len(notes) == 1
    assert "armnet_tiny" in notes[0] and "48x48" in notes[0] and "s a step" in notes[0]
    assert "--model armnet_tiny" in notes[0]
    args.model, args.crop_size, args.batch_size = "armnet_r50", [512, 512], 8
    cpu, warn = train_module.setup_notices(args, torch.device("cpu"))
    assert "armnet_r50" in cpu and "512x512" in cpu and "41 s a step" in cpu
    assert "--backbone-weights" in warn
    assert train_module.setup_notices(args, torch.device("cuda")) == [warn]
    args.backbone_weights = "resnet50.pth"
    assert train_module.setup_notices(args, torch.device("cuda")) == []


def test_train_prints_the_cpu_notice(tmp_path, capsys):
    train(_train_args(tmp_path, "--max-steps", "1", "--device", "cpu"))
    err = capsys.readouterr().err
    assert "no GPU in use: training armnet_tiny on 48x48 crops" in err


def test_resume_keeps_the_best_of_the_whole_run(tmp_path, monkeypatch):
    import armnet.evaluate as evaluate_module
    scores = iter([0.5, 0.3, 0.2])
    monkeypatch.setattr(evaluate_module, "evaluate",
                        lambda a: {"metrics": {"F": next(scores), "images": 1}})
    train(_train_args(tmp_path, "--val-every", "2", "--max-steps", "2"))
    summary = train(_train_args(tmp_path, "--val-every", "2", "--resume", "auto"))
    assert summary["best"]["F"] == 0.5 and summary["best"]["step"] == 2
    assert torch.load(tmp_path / "best.pt", weights_only=False)["iteration"] == 2
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [(v["step"], v["F"]) for v in log["val"]] == [(2, 0.5), (4, 0.3), (6, 0.2)]


def test_val_split_without_images_fails_before_training(tmp_path):
    from armnet.data import write_synthetic
    write_synthetic(str(tmp_path / "data"), 4, 0, (48, 48), "train")
    args = _train_args(tmp_path / "run", "--val-every", "2", "--val-split", "val")
    args.dataset, args.data_root = "textseg", str(tmp_path / "data")
    with pytest.raises((RuntimeError, ValueError, KeyError), match="val"):
        train(args)
    assert not (tmp_path / "run" / "last.pt").exists()
