"""armnet: the ARM-Net scene text segmentation model on top of armnet_ops.

    from armnet import armnet_r50, armnet_tiny
    model = armnet_tiny(ops_backend="auto")
    logits = model(images)["logits"]            # (N, 2, H, W)

Command line: `python -m armnet {train,eval,predict,export,check-data,synth} --help`.

The names below are imported on first use, not with the package: `python -m armnet predict
--onnx` runs on ONNX Runtime without torch, and the package is imported before its CLI.
"""
import importlib

_LAZY = {"load_backbone_weights": ".backbone", "resnet50_os8": ".backbone",
         "resnet_tiny": ".backbone", "ARMNet": ".model", "ARMNetLoss": ".model",
         "armnet_r50": ".model", "armnet_tiny": ".model", "build_model": ".model"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'armnet' has no attribute {name!r}")


__all__ = sorted(_LAZY)
