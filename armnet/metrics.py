"""Foreground (text) segmentation metrics, as TexRNet computes them.

Every count is over the pixels whose label is not ignore (255): a prediction on an ignore pixel
counts nowhere. Per image: tp, fp, fn and tn (text/background predicted on text/background).

* **TexRNet style** (the F-score of the published tables; SHI-Labs/Rethinking-Text-Segmentation,
  `lib/evaluate_service.py`, `fscore`): for each image P_i = tp/(tp+fp) and R_i = tp/(tp+fn), where
  P_i = 0 when the image has no predicted text pixel and R_i = 0 when it has no ground-truth text.
  Every image enters both means, so an image without text, or one whose pixels are all ignore,
  adds 0 to the sum of P and to that of R (even when nothing is predicted). P and R are the means
  over all images and F = 2PR/(P+R) is computed from the two means, not as a mean of per-image F.
* **Dataset level**: tp, fp, fn, tn summed over the dataset; P = tp/(tp+fp), R = tp/(tp+fn),
  F = 2PR/(P+R), fgIoU = tp/(tp+fp+fn), bgIoU = tn/(tn+fp+fn) and mIoU = the mean of fgIoU and
  bgIoU (TexRNet's `miou`: intersection and union summed over the dataset per class, then
  `nanmean` over the two classes, so a class whose union is empty is left out).

Where TexRNet divides by zero and gets NaN (F when P + R = 0, a dataset-level ratio with nothing
in its denominator), these functions return 0, so the JSON stays valid.
"""
from __future__ import annotations

import torch

IGNORE = 255


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _f(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


class TextSegMetrics:
    """Accumulates per-image counts; `update(pred, target)` takes (H, W) or (N, H, W) label maps
    (pred: 1 = text, anything else = background; target: 1 text, 0 background, 255 ignore)."""

    def __init__(self, ignore_index: int = IGNORE):
        self.ignore_index = ignore_index
        self.per_image: list[tuple[int, int, int, int]] = []   # (tp, fp, fn, tn)

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
        tn = (~p & ~t & valid).flatten(1).sum(1)
        for c in zip(tp.tolist(), fp.tolist(), fn.tolist(), tn.tolist()):
            self.per_image.append(c)

    def merge(self, other_counts: list[tuple[int, int, int, int]]) -> None:
        """Adds another process's `per_image` list (tp, fp, fn, tn per image)."""
        for c in other_counts:
            if len(c) != 4:
                raise ValueError(f"per-image counts must be (tp, fp, fn, tn), got {tuple(c)}")
            self.per_image.append(tuple(int(v) for v in c))

    def compute(self) -> dict[str, float]:
        n = len(self.per_image)
        if n == 0:
            raise ValueError("no images were evaluated")
        P = sum(_ratio(tp, tp + fp) for tp, fp, _, _ in self.per_image) / n
        R = sum(_ratio(tp, tp + fn) for tp, _, fn, _ in self.per_image) / n
        TP, FP, FN, TN = (sum(c[k] for c in self.per_image) for k in range(4))
        dP, dR = _ratio(TP, TP + FP), _ratio(TP, TP + FN)
        unions = {"fg": TP + FP + FN, "bg": TN + FP + FN}
        ious = {"fg": _ratio(TP, unions["fg"]), "bg": _ratio(TN, unions["bg"])}
        present = [ious[k] for k in ("bg", "fg") if unions[k] > 0]   # TexRNet's nanmean
        return {"images": n,
                "images_without_text": sum(1 for tp, _, fn, _ in self.per_image if tp + fn == 0),
                "images_fully_ignored": sum(1 for c in self.per_image if sum(c) == 0),
                "P": P, "R": R, "F": _f(P, R),
                "dataset_P": dP, "dataset_R": dR, "dataset_F": _f(dP, dR),
                "fgIoU": ious["fg"], "bgIoU": ious["bg"],
                "mIoU": sum(present) / len(present) if present else 0.0,
                "tp": TP, "fp": FP, "fn": FN, "tn": TN}


def format_table(metrics: dict[str, float], title: str = "") -> str:
    rows = [("TexRNet-style (per-image means)", metrics["P"], metrics["R"], metrics["F"], None,
             None),
            ("dataset level", metrics["dataset_P"], metrics["dataset_R"], metrics["dataset_F"],
             metrics["fgIoU"], metrics["mIoU"])]
    lines = [title] if title else []
    lines.append(f"{'':33s} {'P':>7s} {'R':>7s} {'F':>7s} {'fgIoU':>7s} {'mIoU':>7s}")
    for name, p, r, f, iou, miou in rows:
        extra = "".join(f" {'' if v is None else f'{100 * v:7.2f}':>7s}" for v in (iou, miou))
        lines.append(f"{name:33s} {100 * p:7.2f} {100 * r:7.2f} {100 * f:7.2f}{extra}")
    lines.append(f"({metrics['images']} images, {metrics['images_without_text']} without text, "
                 f"{metrics['images_fully_ignored']} fully ignored; ignore pixels excluded)")
    return "\n".join(lines)
