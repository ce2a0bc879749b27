"""Lets a plain `torch.onnx.export(model, args, dynamo=True)` translate the armnet_ops ops, with
nothing for the user to pass, while `import armnet_ops` never imports onnxscript (it costs about
half an `import torch`, and it is an optional dependency).

The translations live in armnet_ops.onnx and register themselves with onnxscript's torchlib
registry on import; the exporter reads that registry each time it builds its op table, in
torch.onnx._internal.exporter._registration. So armnet_ops.onnx is imported right after that
module loads (a one-shot import hook), or at once when it is already loaded. Without onnxscript
nothing is installed: the exporter cannot run anyway.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

EXPORTER_REGISTRY = "torch.onnx._internal.exporter._registration"


def register_translations() -> None:
    try:
        from . import onnx  # noqa: F401  (registers on import)
    except Exception as e:  # noqa: BLE001 - an export must not fail for a registration problem here
        warnings.warn(f"armnet_ops: the ONNX translations of its ops are not registered ({e}); "
                      "torch.onnx.export will not know them", RuntimeWarning, stacklevel=2)


class _AfterExporterImport(importlib.abc.MetaPathFinder):
    """Finds the exporter's registry module through the other finders, then wraps its loader so
    that register_translations runs once the module has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != EXPORTER_REGISTRY:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register_translations()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if importlib.util.find_spec("onnxscript") is None:
        return
    if EXPORTER_REGISTRY in sys.modules:
        register_translations()
    elif not any(isinstance(f, _AfterExporterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterExporterImport())
