"""`python -m armnet export --checkpoint C --format onnx|aoti --out F [--dynamic] [--fp16]`.

Writes the model (normalised image (N, 3, H, W) -> logits (N, 2, H, W); the REM map is not an
output) as

* onnx: an ONNX model in standard operators only, through the dynamo exporter and the
  translations of armnet_ops/onnx.py, one file (weights inside); input "image", output "logits".
  Runs anywhere ONNX runs: `python -m armnet predict --onnx F`, without torch.
* aoti: an AOTInductor package (.pt2), compiled C++ for this machine's CPU (or GPU). The package
  calls the armnet_ops kernels through the dispatcher, so `import armnet_ops` before
  `torch._inductor.aoti_load_package(F)`. It is compiled for a contiguous (NCHW) input and reads
  whatever it is given with those strides: AOTInductor does not check them (unless the
  environment sets AOTI_RUNTIME_CHECK_INPUTS=1), so a channels_last image, such as numpy's
  HWC -> CHW transpose gives, is silently read as garbage. `load_aoti` returns the package
  behind a wrapper that makes its input contiguous.

--fp16 on a machine without CUDA traces the ops' reference backend (the C++ CPU kernels are
fp32/fp64 only), so that graph holds the reference's ATen ops, whose criss-cross mask is -inf,
rather than our translations; ONNX Runtime runs it correctly, but export fp16 on a GPU machine for
TensorRT.

Then it reloads what it wrote and checks it against eager PyTorch on a random input and on a
synthetic text image (armnet.synth), at the export size and, with --dynamic, at another batch
size and a size that is not a multiple of 8. Success is reported only when every check is within
tolerance (fp32: 1e-4 of the logits' scale; fp16: 1e-2); else the error says by how much it
missed.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint import load_model
from .imaging import normalize_array
from .synth import render_sample

FORMATS = {"onnx": ".onnx", "aoti": ".pt2"}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}


class LogitsOnly(nn.Module):
    """The deployed graph: the model's logits alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model(image)["logits"]


def check_output(path: str, fmt: str) -> None:
    """A clear error before any work for a wrong format or an output that cannot be written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not path.endswith(FORMATS[fmt]):
        raise ValueError(f"--out must end with {FORMATS[fmt]!r} for --format {fmt}, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out: the folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"--out: {path!r} is a folder, expected a file name")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--out: {path!r} is not writable")


def dynamic_shapes():
    """Batch, height and width symbolic."""
    dim = torch.export.Dim.DYNAMIC
    return ({0: dim, 2: dim, 3: dim},)


def export_onnx(module: nn.Module, example: torch.Tensor, path: str, dynamic: bool,
                opset: int | None = None) -> None:
    import onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                    input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=dynamic_shapes() if dynamic else None,
                                    verbose=False)
    program.save(path, external_data=False)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                     if n.domain not in ("", "ai.onnx")})
    if custom or model.functions:
        raise RuntimeError(f"the exported graph is not standard ONNX: nodes {custom}, "
                           f"{len(model.functions)} local functions")


def export_aoti(module: nn.Module, example: torch.Tensor, path: str, dynamic: bool) -> None:
    """Compiles the package for a contiguous input: the layout `load_aoti` feeds it."""
    ep = torch.export.export(module, (example.contiguous(),),
                             dynamic_shapes=dynamic_shapes() if dynamic else None)
    torch._inductor.aoti_compile_and_package(ep, package_path=path)


def load_aoti(path: str):
    """The AOTInductor package at `path` as a function image -> logits (tensors). The input is
    made contiguous first: the compiled code indexes it with the strides it was traced with
    (contiguous, see export_aoti) and never looks at the strides it is given."""
    runner = torch._inductor.aoti_load_package(path)
    return lambda x: runner(x.contiguous())


def load_runner(path: str, fmt: str, threads: int = 0):
    """A function numpy/torch input -> numpy logits that runs the written file."""
    if fmt == "onnx":
        from .onnx_infer import OnnxSegmenter
        seg = OnnxSegmenter(path, threads)
        return lambda x: seg.logits(x.float().numpy() if isinstance(x, torch.Tensor) else x)
    runner = load_aoti(path)
    return lambda x: runner(x).float().numpy()


def check_inputs(example: torch.Tensor, dynamic: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named inputs to compare on: random and a synthetic image at the export size; with
    `dynamic`, also a batch of 3 at a size that is not a multiple of 8.

    The synthetic image is laid out channels_last, as numpy's HWC -> CHW transpose leaves an
    image loaded with normalize_array: the runners must give eager's logits for either layout
    (an AOTInductor package fed a channels_last tensor as is does not)."""
    N, _, H, W = example.shape
    g = torch.Generator().manual_seed(seed)
    image = normalize_array(Image.fromarray(render_sample(np.random.default_rng(seed), (H, W))[0]))
    inputs = {f"random {N}x3x{H}x{W}": torch.randn(example.shape, generator=g),
              f"synthetic image {H}x{W}": torch.from_numpy(image)[None].contiguous(
                  memory_format=torch.channels_last)}
    if dynamic:
        h, w = (H + 3 if (H + 3) % 8 else H + 5), (W + 5 if (W + 5) % 8 else W + 3)
        inputs[f"random 3x3x{h}x{w}"] = torch.randn((3, 3, h, w), generator=g)
    return {k: v.to(example.dtype) for k, v in inputs.items()}


def verify(module: nn.Module, run, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """{name: max abs difference} of `run` against eager; raises when one is out of tolerance."""
    report = {}
    for name, x in inputs.items():
        with torch.no_grad():
            ref = module(x).float().numpy()
        got = run(x)
        if got.shape != ref.shape:
            raise RuntimeError(f"check on {name}: the exported model gives logits of shape "
                               f"{got.shape}, eager {ref.shape}")
        diff = float(np.abs(got - ref).max())
        tol = TOLERANCE[dtype] * max(1.0, float(np.abs(ref).max()))
        report[name] = diff
        if not diff <= tol:  # also catches NaN
            raise RuntimeError(f"check on {name}: the exported model differs from eager by {diff:.3g} "
                               f"(tolerance {tol:.3g})")
    return report


def export_model(model: nn.Module, fmt: str, path: str, *, size=(256, 256), dynamic: bool = False,
                 fp16: bool = False, opset: int | None = None) -> dict:
    """Exports `model` (an ARMNet in eval mode), reloads the result and checks it against eager;
    returns {input name: max abs difference}."""
    check_output(path, fmt)
    dtype = torch.float16 if fp16 else torch.float32
    module = LogitsOnly(model).to(dtype).eval()
    # A dynamic batch is traced at 2: a traced size of 1 would be specialised.
    example = torch.randn(2 if dynamic else 1, 3, *size, dtype=dtype)
    if fmt == "onnx":
        export_onnx(module, example, path, dynamic, opset)
    else:
        export_aoti(module, example, path, dynamic)
    return verify(module, load_runner(path, fmt), check_inputs(example, dynamic), dtype)


def export(args) -> dict:
    model, ckpt = load_model(args.checkpoint)
    model.eval()
    report = export_model(model, args.format, args.out, size=tuple(args.size),
                          dynamic=args.dynamic, fp16=args.fp16, opset=args.opset)
    print(f"wrote {args.out} ({args.format}, {ckpt['model_name']}, "
          f"{'fp16' if args.fp16 else 'fp32'}, {'dynamic' if args.dynamic else 'fixed'} shapes)")
    for name, diff in report.items():
        print(f"  checked against eager on {name}: max |diff| {diff:.2e}")
    return report
