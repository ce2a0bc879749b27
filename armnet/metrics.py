"""Foreground (text) segmentation metrics.

Two views, both over non-ignore pixels only (label 255 never counts):

* **TexRNet style** (the numbers the paper's Table 1 reports): for each image, P_i = tp/(tp+fp) and
  R_i = tp/(tp+fn); P and R are the means over images, and F = 2PR/(P+R) is computed from those
  means (not the mean of per-image F).
  Empty cases, chosen so a perfect prediction always scores 1: an image with no predicted text has
  P_i = 1 if it has no text either, else 0; an image with no text has R_i = 1.
* **Dataset level**: tp, fp, fn summed over the dataset; P = tp/(tp+fp), R = tp/(tp+fn),
  F = 2PR/(P+R) and fgIoU = tp/(tp+fp+fn). A ratio whose denominator is 0 is 1 if the
  numerator's "misses" are 0 too (nothing to find and nothing wrongly found), i.e. an empty
  dataset with empty predictions scores 1.
"""
from __future__ import annotations

import torch

IGNORE = 255


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den > 0 else empty


def _f(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


class TextSegMetrics:
    """Accumulates per-image counts; `update(pred, target)` takes (H, W) or (N, H, W) label maps."""

    def __init__(self, ignore_index: int = IGNORE):
        self.ignore_index = ignore_index
        self.per_image: list[tuple[int, int, int]] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        valid = target != self.ignore_index
        p = (pred == 1) & valid
        t = (target == 1) & valid
        tp = (p & t).flatten(1).sum(1)
        fp = (p & ~t).flatten(1).sum(1)
        fn = (~p & t).flatten(1).sum(1)
        for a, b, c in zip(tp.tolist(), fp.tolist(), fn.tolist()):
            self.per_image.append((a, b, c))

    def merge(self, other_counts: list[tuple[int, int, int]]) -> None:
        self.per_image.extend(tuple(c) for c in other_counts)

    def compute(self) -> dict[str, float]:
        n = len(self.per_image)
        if n == 0:
            raise ValueError("no images were evaluated")
        ps, rs = [], []
        for tp, fp, fn in self.per_image:
            ps.append(_ratio(tp, tp + fp, 1.0 if fn == 0 else 0.0))
            rs.append(_ratio(tp, tp + fn, 1.0))
        P, R = sum(ps) / n, sum(rs) / n
        TP = sum(c[0] for c in self.per_image)
        FP = sum(c[1] for c in self.per_image)
        FN = sum(c[2] for c in self.per_image)
        dP = _ratio(TP, TP + FP, 1.0 if FN == 0 else 0.0)
        dR = _ratio(TP, TP + FN, 1.0)
        return {"images": n, "P": P, "R": R, "F": _f(P, R),
                "dataset_P": dP, "dataset_R": dR, "dataset_F": _f(dP, dR),
                "fgIoU": _ratio(TP, TP + FP + FN, 1.0), "tp": TP, "fp": FP, "fn": FN}


def format_table(metrics: dict[str, float], title: str = "") -> str:
    rows = [("TexRNet-style (per-image mean)", metrics["P"], metrics["R"], metrics["F"], None),
            ("dataset level", metrics["dataset_P"], metrics["dataset_R"], metrics["dataset_F"],
             metrics["fgIoU"])]
    lines = [title] if title else []
    lines.append(f"{'':32s} {'P':>7s} {'R':>7s} {'F':>7s} {'fgIoU':>7s}")
    for name, p, r, f, iou in rows:
        lines.append(f"{name:32s} {100 * p:7.2f} {100 * r:7.2f} {100 * f:7.2f} "
                     f"{'' if iou is None else f'{100 * iou:7.2f}':>7s}")
    lines.append(f"({metrics['images']} images, ignore pixels excluded)")
    return "\n".join(lines)
