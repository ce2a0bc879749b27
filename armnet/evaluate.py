"""`python -m armnet eval` and `python -m armnet predict`.

eval: runs a checkpoint over a dataset split (images at their own size, batch 1 unless all images
share a size), accumulates armnet.metrics.TextSegMetrics, prints the table and writes JSON
(metrics, checkpoint, dataset, the test protocol and what it is comparable with, device, time).

Test protocols (both commands):

* `--scales S ...` (default one scale, 1.0: the plain forward pass): multi-scale testing as
  segmentation toolkits do it (mmseg's aug_test). The image is resized by each factor, the logits
  are resized back to the image's size and the softmax probabilities are averaged.
* `--protocol texrnet`: TexRNet's published test, 8 sizes of fixed area (see TEXRNET_SIDES), the
  softmax probabilities averaged at the original size, no flip. Numbers from it are the ones to
  compare with TexRNet's (and ARM-Net's) tables.

`--max-side N` first downscales an image whose longer side exceeds N (antialiased bilinear); the
probabilities are still averaged at the image's original size, where the metrics are computed.
Synthetic eval defaults to a seed other than training's (armnet.cli.EVAL_SYNTH_SEED).

predict: for each IMAGE writes `<out>/<stem>_mask.png` (0 background / 255 text) and
`<out>/<stem>_overlay.png` (the image with text pixels tinted red and outlined, for a person);
it prints one line per image unless `--quiet`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from armnet_ops.info import environment

from .checkpoint import load_model
from .data import build_dataset, collate
from .imaging import limited_size, load_image, normalize_array, write_prediction
from .metrics import TextSegMetrics, format_table
from .train import amp_dtype


def _device(arg: str) -> torch.device:
    return torch.device("cuda" if arg == "auto" and torch.cuda.is_available()
                        else ("cpu" if arg == "auto" else arg))


def check_scales(scales) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"scales must be one or more finite factors > 0, got {list(scales)}")
    return scales


# TexRNet's multi-scale test (SHI-Labs/Rethinking-Text-Segmentation, eval_utils.py: set_cfg's
# cfg.TEST.INFERENCE_MS and es.main): for each f in 0.75, 1.00, ..., 2.50 the image is resized so
# that its area is S² with S = int(512·f) + 1 (385, 513, ..., 1281), keeping its aspect ratio:
# ratio = sqrt(S² / (h·w)), th = int(h·ratio), tw = int(w·ratio), then each side is floored to a
# multiple of 32 plus 1 (th // 32 * 32 + 1). Image and output are resized bilinearly with
# align_corners=True (cfg.DATA.ALIGN_CORNERS); no flip (cfg.TEST.INFERENCE_FLIP = False). The
# network returns softmax probabilities in eval mode (texrnet.py, ineval_output_argmax=False),
# which are resized to the original size and averaged over the 8 sizes; the label is their argmax.
TEXRNET_FACTORS = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5)
TEXRNET_SIDES = tuple(int(512 * f) + 1 for f in TEXRNET_FACTORS)


def texrnet_test_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """The 8 (height, width) at which TexRNet's protocol runs an h×w image."""
    sizes = []
    for side in TEXRNET_SIDES:
        ratio = math.sqrt(side * side / (h * w))
        th, tw = int(h * ratio), int(w * ratio)
        sizes.append((th // 32 * 32 + 1, tw // 32 * 32 + 1))
    return sizes


@torch.no_grad()
def _average_probs(model, image, dtype, sizes, out_size, softmax_first: bool,
                   align_corners: bool) -> torch.Tensor:
    """Runs `model` on `image` resized to each of `sizes`, returns the mean class probabilities at
    `out_size`. softmax_first: softmax at the network's resolution, then resize the probabilities
    (TexRNet); otherwise resize the logits, then softmax (mmseg's aug_test)."""
    probs = None
    for hw in sizes:
        x = image
        if tuple(hw) != tuple(image.shape[-2:]):
            x = F.interpolate(image, size=hw, mode="bilinear", align_corners=align_corners)
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)["logits"].float()
        if softmax_first:
            p = torch.softmax(logits, 1)
            if p.shape[-2:] != out_size:
                p = F.interpolate(p, size=out_size, mode="bilinear", align_corners=align_corners)
        else:
            if logits.shape[-2:] != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear",
                                       align_corners=align_corners)
            p = torch.softmax(logits, 1)
        probs = p if probs is None else probs + p
    return probs / len(sizes)


def predict_probs(model, image: torch.Tensor, dtype=None, scales=(1.0,), size=None) -> torch.Tensor:
    """Class probabilities (N, 2, *size) of `image` (N, 3, H, W), averaged over the test `scales`.

    `size` (default (H, W)) is where the logits of each scale are resized to (bilinear) before the
    softmax. With one scale of 1.0 and no `size`, this is softmax(model(image)).
    """
    h, w = image.shape[-2:]
    sizes = [(max(round(h * s), 1), max(round(w * s), 1)) for s in check_scales(scales)]
    return _average_probs(model, image, dtype, sizes, tuple(size or (h, w)), False, False)


def texrnet_probs(model, image: torch.Tensor, dtype=None, size=None) -> torch.Tensor:
    """Class probabilities (N, 2, *size) by TexRNet's 8-size protocol (see TEXRNET_SIDES); the
    sizes follow from `image`'s area, `size` (default (H, W)) is where they are averaged."""
    h, w = image.shape[-2:]
    return _average_probs(model, image, dtype, texrnet_test_sizes(h, w), tuple(size or (h, w)),
                          True, True)


def protocol_record(protocol: str, scales) -> dict:
    """What the eval JSON says about the test protocol, and which published numbers it matches."""
    if protocol == "texrnet":
        return {"name": "texrnet", "sides": list(TEXRNET_SIDES), "factors": list(TEXRNET_FACTORS),
                "resize": "area = side², sides floored to 32k+1, bilinear, align_corners=True",
                "average": "softmax probabilities at the original size", "flip": False,
                "comparable_with": "TexRNet's published tables (8-size multi-scale test)"}
    if protocol != "scales":
        raise ValueError(f"protocol must be 'scales' or 'texrnet', got {protocol!r}")
    scales = list(check_scales(scales))
    return {"name": "scales", "scales": scales, "flip": False,
            "resize": "image × each scale, bilinear, align_corners=False",
            "average": "softmax of the logits resized to the original size",
            "comparable_with": ("single-scale numbers" if scales == [1.0]
                                else "multi-scale numbers with these scales")}


def _probs(args, model, x, dtype, size):
    """The protocol's probabilities of the batch `x`, at `size` (after --max-side)."""
    x = limit_side(x, args.max_side)
    if args.protocol == "texrnet":
        return texrnet_probs(model, x, dtype, size)
    return predict_probs(model, x, dtype, args.scales, size)


def limit_side(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """`x` (N, C, H, W) downscaled (bilinear, antialiased) so its longer side is at most
    `max_side`; unchanged if it already is or `max_side` is 0."""
    size = limited_size(*x.shape[-2:], max_side)
    if size is None:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def evaluate(args) -> dict:
    device = _device(args.device)
    protocol = protocol_record(args.protocol, args.scales)
    if args.protocol == "texrnet" and list(args.scales) != [1.0]:
        raise ValueError(f"--scales {' '.join(f'{s:g}' for s in args.scales)} cannot be combined "
                         "with --protocol texrnet (which fixes its own 8 sizes)")
    limit_side(torch.zeros(1, 1, 1, 1), args.max_side)       # checks --max-side before any work
    # the dataset first: a broken tree is reported before a large model is loaded
    dataset = build_dataset(args.dataset, args.data_root, args.split, augment=None,
                            synth_n=args.synth_n, synth_seed=args.synth_seed,
                            synth_size=tuple(args.synth_size), rem_target=None)
    model, ckpt = load_model(args.checkpoint, args.model, args.ops_backend)
    model.to(device).eval()
    n = len(dataset) if not args.max_images else min(args.max_images, len(dataset))
    if n == 0:
        raise RuntimeError(f"the {args.dataset} {args.split!r} split has no images")
    subset = torch.utils.data.Subset(dataset, range(n))
    bs = args.batch_size if args.dataset == "synthetic" else 1
    loader = DataLoader(subset, bs, shuffle=False, num_workers=args.workers, collate_fn=collate)
    metrics = TextSegMetrics()
    dtype = amp_dtype(args.amp, device)
    trained = ckpt.get("args") or {}
    if (args.dataset == "synthetic" and trained.get("dataset") == "synthetic"
            and trained.get("synth_seed") == args.synth_seed):
        print(f"warning: synthetic seed {args.synth_seed} is the one the checkpoint was trained "
              "on: these images are not held out", file=sys.stderr)
    t0 = time.time()
    for batch in tqdm(loader, desc="eval", disable=args.quiet, dynamic_ncols=True, leave=False):
        mask = batch["mask"]
        probs = _probs(args, model, batch["image"].to(device), dtype, tuple(mask.shape[-2:]))
        metrics.update(probs.argmax(1).cpu(), mask)
    result = metrics.compute()
    elapsed = time.time() - t0
    title = f"{ckpt['model_name']} on {args.dataset}/{args.split}"
    if args.dataset == "synthetic":
        title += f" (seed {args.synth_seed}, {n} images)"
    if args.protocol == "texrnet":
        title += ", TexRNet protocol (8 sizes, 385-1281 px)"
    elif protocol["scales"] != [1.0]:
        title += f", test scales {', '.join(f'{s:g}' for s in protocol['scales'])}"
    if args.max_side:
        title += f", longer side <= {args.max_side}"
    print(format_table(result, title))
    report = {"metrics": result, "checkpoint": args.checkpoint,
              "model": ckpt["model_name"], "model_kwargs": ckpt.get("model_kwargs", {}),
              "trained_steps": ckpt.get("iteration"),
              "dataset": {"name": args.dataset, "root": args.data_root, "split": args.split,
                          **({"synth_n": args.synth_n, "synth_seed": args.synth_seed,
                              "synth_size": list(args.synth_size)}
                             if args.dataset == "synthetic" else {})},
              "protocol": protocol, "scales": protocol.get("scales"), "max_side": args.max_side,
              "ops_backend": args.ops_backend, "seconds": elapsed,
              "environment": environment(device)}
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out_json}")
    return report


def predict(args) -> list[str]:
    device = _device(args.device)
    protocol_record(args.protocol, args.scales)
    limit_side(torch.zeros(1, 1, 1, 1), args.max_side)
    model, _ = load_model(args.checkpoint, args.model, args.ops_backend)
    model.to(device).eval()
    dtype = amp_dtype(args.amp, device)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for path in args.images:
        img = load_image(path)
        x = torch.from_numpy(normalize_array(img))
        probs = _probs(args, model, x[None].to(device), dtype, (img.height, img.width))
        mask = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
        written += write_prediction(path, img, mask, args.out, quiet=args.quiet)
    return written
