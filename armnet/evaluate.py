"""`python -m armnet eval` and `python -m armnet predict`.

eval: runs a checkpoint over a dataset split (images at their own size, batch 1 unless all images
share a size), accumulates armnet.metrics.TextSegMetrics, prints the table and writes JSON
(metrics, checkpoint, dataset, test scales, device, time).

Both take `--scales`: multi-scale testing as segmentation toolkits do it (mmseg's aug_test). The
image is resized by each factor, the logits are resized back to the image's size and the softmax
probabilities are averaged; the default, one scale of 1.0, is the plain forward pass.

predict: for each IMAGE writes `<out>/<stem>_mask.png` (0 background / 255 text) and
`<out>/<stem>_overlay.png` (the image with text pixels tinted red and outlined, for a person).
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from armnet_ops.info import environment

from .checkpoint import load_model
from .data import build_dataset, collate
from .imaging import fit_max_side, load_image, normalize_array, write_prediction
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


@torch.no_grad()
def predict_probs(model, image: torch.Tensor, dtype=None, scales=(1.0,), size=None) -> torch.Tensor:
    """Class probabilities (N, 2, *size) of `image` (N, 3, H, W), averaged over the test `scales`.

    `size` (default (H, W)) is where the logits of each scale are resized to (bilinear) before the
    softmax. With one scale of 1.0 and no `size`, this is softmax(model(image)).
    """
    size, scales = tuple(size or image.shape[-2:]), check_scales(scales)
    probs = None
    for s in scales:
        x = image
        if s != 1.0:
            hw = (max(round(image.shape[-2] * s), 1), max(round(image.shape[-1] * s), 1))
            x = F.interpolate(image, size=hw, mode="bilinear", align_corners=False)
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)["logits"].float()
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        p = torch.softmax(logits, 1)
        probs = p if probs is None else probs + p
    return probs / len(scales)


def evaluate(args) -> dict:
    device = _device(args.device)
    scales = check_scales(args.scales)
    model, ckpt = load_model(args.checkpoint, args.model, args.ops_backend)
    model.to(device).eval()
    dataset = build_dataset(args.dataset, args.data_root, args.split, augment=None,
                            synth_n=args.synth_n, synth_seed=args.synth_seed,
                            synth_size=tuple(args.synth_size), rem_target=None)
    n = len(dataset) if not args.max_images else min(args.max_images, len(dataset))
    if n == 0:
        raise RuntimeError(f"the {args.dataset} {args.split!r} split has no images")
    subset = torch.utils.data.Subset(dataset, range(n))
    bs = args.batch_size if args.dataset == "synthetic" else 1
    loader = DataLoader(subset, bs, shuffle=False, num_workers=args.workers, collate_fn=collate)
    metrics = TextSegMetrics()
    dtype = amp_dtype(args.amp, device)
    t0 = time.time()
    for batch in tqdm(loader, desc="eval", disable=args.quiet, dynamic_ncols=True, leave=False):
        probs = predict_probs(model, batch["image"].to(device), dtype, scales)
        metrics.update(probs.argmax(1).cpu(), batch["mask"])
    result = metrics.compute()
    elapsed = time.time() - t0
    title = f"{ckpt['model_name']} on {args.dataset}/{args.split}"
    if scales != (1.0,):
        title += f", test scales {', '.join(f'{s:g}' for s in scales)}"
    print(format_table(result, title))
    report = {"metrics": result, "checkpoint": args.checkpoint,
              "model": ckpt["model_name"], "model_kwargs": ckpt.get("model_kwargs", {}),
              "trained_steps": ckpt.get("iteration"),
              "dataset": {"name": args.dataset, "root": args.data_root, "split": args.split,
                          **({"synth_n": args.synth_n, "synth_seed": args.synth_seed,
                              "synth_size": list(args.synth_size)}
                             if args.dataset == "synthetic" else {})},
              "scales": list(scales), "ops_backend": args.ops_backend, "seconds": elapsed,
              "environment": environment(device)}
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out_json}")
    return report


def predict(args) -> list[str]:
    device = _device(args.device)
    scales = check_scales(args.scales)
    model, _ = load_model(args.checkpoint, args.model, args.ops_backend)
    model.to(device).eval()
    dtype = amp_dtype(args.amp, device)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for path in args.images:
        img = load_image(path)
        x = torch.from_numpy(normalize_array(fit_max_side(img, args.max_side)))
        probs = predict_probs(model, x[None].to(device), dtype, scales, (img.height, img.width))
        mask = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
        written += write_prediction(path, img, mask, args.out)
    return written
