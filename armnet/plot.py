"""`python -m armnet plot RUN`: training curves from `RUN/train_log.json` into `RUN/curves.png`.

Three panels over the optimizer step: the training loss (each step, light, and its running mean
over 50 steps), the learning rate, and the validation F (TexRNet-style; only when the run had
`--val-every`), with the best step marked. matplotlib is optional: without it, plotting raises an
ImportError that says how to install it (`train` then skips the PNG silently).
"""
from __future__ import annotations

import json
import os

MPL_HINT = "plotting needs matplotlib, which is optional: `pip install matplotlib`"


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to window - 1 values before it."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_log(run: str, out: str | None = None) -> str:
    """Draws the curves of the run folder (or train_log.json) `run`; returns the PNG's path."""
    log_path = os.path.join(run, "train_log.json") if os.path.isdir(run) else run
    if not os.path.isfile(log_path):
        raise FileNotFoundError(f"plot: no training log at {log_path!r} (train writes "
                                f"<out>/train_log.json)")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(MPL_HINT) from e
    with open(log_path) as f:
        log = json.load(f)
    history, val = log.get("history", []), log.get("val", [])
    if not history:
        raise ValueError(f"plot: {log_path!r} holds no training steps")
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
    axes[0].plot(steps, running_mean(loss, 50), color="tab:blue", label="mean of 50 steps")
    axes[0].set_ylabel("training loss")
    axes[0].legend(loc="upper right")
    axes[1].plot(steps, [h["lr"] for h in history], color="tab:orange")
    axes[1].set_ylabel("learning rate")
    if val:
        f = [v["F"] for v in val]
        axes[2].plot([v["step"] for v in val], f, "o-", color="tab:green")
        b = max(range(len(f)), key=f.__getitem__)
        axes[2].annotate(f"best {f[b]:.3f}", (val[b]["step"], f[b]), textcoords="offset points",
                         xytext=(0, 8), ha="center")
    else:
        axes[2].text(0.5, 0.5, "no validation (train with --val-every N)", ha="center",
                     va="center", transform=axes[2].transAxes)
    axes[2].set_ylabel("validation F")
    axes[2].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    fig.tight_layout()
    out = out or os.path.join(os.path.dirname(log_path), "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
