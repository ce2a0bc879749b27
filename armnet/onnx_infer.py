"""`python -m armnet predict --onnx MODEL.onnx IMAGE... --out DIR`: `predict` on ONNX Runtime,
with numpy, Pillow and onnxruntime only (no torch is imported on this path).

The pre- and post-processing are predict's (armnet/imaging.py holds the shared parts): the image
ImageNet-normalised, downscaled to --max-side; for each test scale the input resized bilinearly,
the logits resized back to the image's size, softmax, averaged; argmax; the mask and the overlay
written. The model is what `python -m armnet export --format onnx` writes: input "image"
(N, 3, H, W) float32 (or float16 with --fp16), output "logits" (N, 2, H, W). A model exported
without --dynamic runs only at its export size, which is checked. predict's `--protocol texrnet`
is not offered here.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from .imaging import limit_side, load_image, normalize_array, resize_bilinear, write_prediction

_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxSegmenter:
    """An exported ARM-Net in an onnxruntime InferenceSession on the CPU execution provider."""

    def __init__(self, path: str, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError("--onnx needs onnxruntime: pip install onnxruntime "
                               "(or armnet-ops[deploy])") from e
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--onnx: no such file {path!r}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise RuntimeError(f"--onnx: cannot load {path!r} as an ONNX model: {e}") from e
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.type not in _ONNX_TYPES:
            raise RuntimeError(f"--onnx: {path!r} is not an exported ARM-Net: its input is "
                               f"{inp.type} {inp.shape}, expected float (N, 3, H, W)")
        self.input_name, self.dtype = inp.name, _ONNX_TYPES[inp.type]
        # Fixed sizes are ints; symbolic (dynamic) ones are strings or None.
        self.fixed_hw = tuple(inp.shape[2:]) if all(isinstance(d, int) for d in inp.shape[2:]) else None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) normalised float32 -> (N, 2, H, W) float32 logits."""
        if self.fixed_hw is not None and tuple(x.shape[2:]) != self.fixed_hw:
            raise RuntimeError(f"this ONNX model was exported for {self.fixed_hw[0]}x"
                               f"{self.fixed_hw[1]} inputs and got {x.shape[2]}x{x.shape[3]}; "
                               "export it with --dynamic for any size")
        (out,) = self.session.run(None, {self.input_name: x.astype(self.dtype)})
        return out.astype(np.float32)

    def probs(self, x: np.ndarray, scales=(1.0,), size=None) -> np.ndarray:
        """predict_probs (armnet/evaluate.py) in numpy: class probabilities at `size` averaged
        over the test scales."""
        size = tuple(size or x.shape[-2:])
        total = None
        for s in scales:
            xs = x
            if s != 1.0:
                xs = resize_bilinear(x, (max(round(x.shape[-2] * s), 1), max(round(x.shape[-1] * s), 1)))
            logits = resize_bilinear(self.logits(xs), size)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
            total = p if total is None else total + p
        return total / len(scales)


def predict_onnx(model: str, images, out: str, max_side: int = 0, scales=(1.0,),
                 threads: int = 0) -> list[str]:
    scales = tuple(float(s) for s in scales)
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"scales must be one or more finite factors > 0, got {list(scales)}")
    seg = OnnxSegmenter(model, threads)
    os.makedirs(out, exist_ok=True)
    written = []
    for path in images:
        img = load_image(path)
        x = limit_side(normalize_array(img)[None], max_side)
        mask = seg.probs(x, scales, (img.height, img.width)).argmax(1)[0].astype(np.uint8)
        written += write_prediction(path, img, mask, out)
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m armnet predict --onnx",
                                description="predict on ONNX Runtime (no torch)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--onnx", required=True, help="a model written by `armnet export --format onnx`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale images whose longer side exceeds this (0: never)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="test scales: average the softmax over the image resized by each")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        predict_onnx(args.onnx, args.images, args.out, args.max_side, args.scales, args.threads)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"armnet predict: error: {e}", file=sys.stderr)
        return 2
    return 0
