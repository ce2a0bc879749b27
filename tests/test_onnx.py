"""ONNX export of every op through plain `torch.onnx.export(..., dynamo=True)` (the
translations in armnet_ops/onnx.py, registered on import), run in ONNX Runtime's CPU execution
provider against the fp64 reference at shapes other than the export's (dynamic batch, height and
width; H = 1 and W = 1; G > 1; s = 1..4). ARM-Net's parity is in test_export.py."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import armnet_ops
from armnet_ops import reference
from armnet_ops.nn import CARAFEPack, CrissCrossAttention, DirectionalConv2d, DirectionalConv2dPair
from numerics import assert_close

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DYN = torch.export.Dim.DYNAMIC
needs_cpp = pytest.mark.skipif(armnet_ops._backend.EXTENSION_ERROR is not None,
                               reason="the C++ ops are what gets translated; build the extension")


class Fn(nn.Module):
    """A functional op as a module, for export."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def export(module, args, dynamic=None, **kw):
    """Plain dynamo export (no translation table passed): the ONNX model, after checking that
    the exported program holds an armnet_ops op (so its translation is what is tested) and that
    the ONNX graph is standard operators only, free of infinite constants."""
    if isinstance(module, Fn) and dynamic is not None:
        dynamic = (dynamic,)  # forward(*args) takes one variadic argument
    program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic,
                                verbose=False, **kw)
    targets = {str(n.target) for n in program.exported_program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("armnet_ops.") for t in targets), targets
    model = program.model_proto
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "custom ONNX domain"
    assert not model.functions
    for init in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        assert arr.dtype.kind != "f" or np.isfinite(arr).all(), f"non-finite constant {init.name}"
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.t.ByteSize():
                    arr = onnx.numpy_helper.to_array(a.t)
                    assert arr.dtype.kind != "f" or np.isfinite(arr).all(), "non-finite Constant"
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(session, *args):
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


# ---- criss-cross attention -------------------------------------------------------------------

CCA_SHAPES = [(1, 1, 7), (2, 6, 1), (1, 1, 1), (3, 9, 4), (2, 5, 6)]  # (N, H, W); C fixed


@needs_cpp
def test_cca_forward_dynamic_shapes():
    q, k, v = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)
    sess = export(Fn(lambda q, k, v: armnet_ops.criss_cross_attention(q, k, v, scale=0.7)),
                  (q, k, v), ({0: DYN, 2: DYN, 3: DYN},) * 3)
    for N, H, W in CCA_SHAPES:
        q, k, v = torch.randn(N, 4, H, W) * 3, torch.randn(N, 4, H, W) * 3, torch.randn(N, 3, H, W)
        (out,) = run(sess, q, k, v)
        assert_close(out, reference.criss_cross_attention(q.double(), k.double(), v.double(), 0.7),
                     what=f"cca {N, H, W}")


@needs_cpp
def test_criss_cross_attention_module_residual():
    """CCNet's block gamma·out + x (cca_residual_forward), gamma non-zero so the attention counts;
    large energies, where a -inf or badly masked softmax would show."""
    m = CrissCrossAttention(16).eval()
    with torch.no_grad():
        m.gamma.fill_(0.8)
        m.query_conv.weight.mul_(4)
    sess = export(m, (torch.randn(2, 16, 6, 5),), ({0: DYN, 2: DYN, 3: DYN},))
    for N, H, W in CCA_SHAPES:
        x = torch.randn(N, 16, H, W)
        with torch.no_grad():
            q, k, v = m.query_conv(x), m.key_conv(x), m.value_conv(x)
            ref = 0.8 * reference.criss_cross_attention(q.double(), k.double(), v.double()) + x.double()
        (y,) = run(sess, x)
        assert_close(y, ref, what=f"CrissCrossAttention {N, H, W}")


@needs_cpp
def test_cca_weight_and_map():
    q, k, v = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)
    ws = export(Fn(armnet_ops.cca_weight), (q, k), ({0: DYN, 2: DYN, 3: DYN},) * 2)
    attn = torch.randn(2, 10, 5, 6)
    ms = export(Fn(armnet_ops.cca_map), (attn, v), ({0: DYN, 1: DYN, 2: DYN, 3: DYN},
                                                    {0: DYN, 2: DYN, 3: DYN}))
    for N, H, W in CCA_SHAPES:
        q, k, v = torch.randn(N, 4, H, W), torch.randn(N, 4, H, W), torch.randn(N, 3, H, W)
        attn = torch.randn(N, H + W - 1, H, W)
        assert_close(run(ws, q, k)[0], reference.cca_weight(q.double(), k.double()),
                     what=f"cca_weight {N, H, W}")
        assert_close(run(ms, attn, v)[0], reference.cca_map(attn.double(), v.double()),
                     what=f"cca_map {N, H, W}")


# ---- CARAFE ---------------------------------------------------------------------------------

CARAFE_CASES = [(3, 2, 1), (5, 1, 2), (3, 4, 3), (1, 2, 4)]  # (k, G, s)
CARAFE_SHAPES = [(1, 1, 5), (2, 4, 1), (1, 1, 1), (3, 6, 7)]  # (N, H, W)


@needs_cpp
@pytest.mark.parametrize("k,G,s", CARAFE_CASES)
def test_carafe_fused(k, G, s):
    C = 2 * G
    f = torch.randn(2, C, 4, 5)
    logits = torch.randn(2, G * k * k * s * s, 4, 5)
    sess = export(Fn(lambda f, m: armnet_ops.carafe_fused(f, m, k, G, s)), (f, logits),
                  ({0: DYN, 2: DYN, 3: DYN},) * 2)
    for N, H, W in CARAFE_SHAPES:
        f, logits = torch.randn(N, C, H, W), torch.randn(N, G * k * k * s * s, H, W) * 3
        assert_close(run(sess, f, logits)[0],
                     reference.carafe_fused(f.double(), logits.double(), k, G, s),
                     what=f"carafe_fused k={k} G={G} s={s} {N, H, W}")


@needs_cpp
@pytest.mark.parametrize("k,G,s", [(3, 2, 2), (5, 1, 1)])
def test_carafe(k, G, s):
    C = 2 * G
    H, W = torch.export.Dim("H"), torch.export.Dim("W")
    f, masks = torch.randn(2, C, 4, 5), torch.rand(2, G * k * k, 4 * s, 5 * s)
    dyn = ({0: DYN, 2: H, 3: W}, {0: DYN, 2: s * H, 3: s * W}) if s > 1 else ({0: DYN, 2: H, 3: W},) * 2
    sess = export(Fn(lambda f, m: armnet_ops.carafe(f, m, k, G, s)), (f, masks), dyn)
    for N, h, w in CARAFE_SHAPES:
        f, masks = torch.randn(N, C, h, w), torch.rand(N, G * k * k, s * h, s * w)
        assert_close(run(sess, f, masks)[0], reference.carafe(f.double(), masks.double(), k, G, s),
                     what=f"carafe k={k} G={G} s={s} {N, h, w}")


@needs_cpp
def test_carafe_pack_module():
    m = CARAFEPack(8, 2, up_kernel=3, up_group=2, compressed_channels=8).eval()
    with torch.no_grad():
        m.content_encoder.weight.normal_(0, 0.3)  # mmcv's init gives near-uniform masks
    sess = export(m, (torch.randn(1, 8, 4, 6),), ({0: DYN, 2: DYN, 3: DYN},))
    for N, H, W in CARAFE_SHAPES:
        x = torch.randn(N, 8, H, W)
        with torch.no_grad():
            logits = m.content_encoder(m.channel_compressor(x))
        assert_close(run(sess, x)[0], reference.carafe_fused(x.double(), logits.double(), 3, 2, 2),
                     what=f"CARAFEPack {N, H, W}")


# ---- directional dilated convolution ----------------------------------------------------------

DCONV_SHAPES = [(1, 1, 9), (2, 7, 1), (1, 1, 1), (2, 10, 13)]


@needs_cpp
@pytest.mark.parametrize("kernel,dilation,relu", [((1, 3), (1, 3), True), ((5, 3), (2, 1), False)])
def test_directional_conv2d(kernel, dilation, relu):
    w, b, sc, sh = torch.randn(6, 4, *kernel), torch.randn(6), torch.rand(6) + 0.5, torch.randn(6)

    def fn(x):
        return armnet_ops.directional_conv2d(x, w, b, dilation, scale=sc, shift=sh,
                                             activation="relu" if relu else None)
    sess = export(Fn(fn), (torch.randn(2, 4, 6, 7),), ({0: DYN, 2: DYN, 3: DYN},))
    for N, H, W in DCONV_SHAPES:
        x = torch.randn(N, 4, H, W)
        ref = reference.directional_conv2d(x.double(), w.double(), b.double(), dilation, sc.double(),
                                           sh.double(), "relu" if relu else None)
        assert_close(run(sess, x)[0], ref, what=f"directional_conv2d {kernel} {dilation} {N, H, W}")


@needs_cpp
def test_directional_conv2d_modules_with_bn():
    """DirectionalConv2d and the pair with a BatchNorm in eval mode: the folded epilogue."""
    single = DirectionalConv2d(4, 5, (1, 3), (1, 2), bn=True, activation="relu")
    pair = DirectionalConv2dPair(4, 5, 3, rate=3, bn=True, activation="relu")
    for bn in (single.bn, pair.horizontal.bn, pair.vertical.bn):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    s_sess = export(single, (torch.randn(1, 4, 6, 6),), ({0: DYN, 2: DYN, 3: DYN},))
    p_sess = export(pair, (torch.randn(1, 4, 6, 6),), ({0: DYN, 2: DYN, 3: DYN},))

    def ref(mod, x):
        scale, shift = mod.folded_bn()
        return reference.directional_conv2d(x.double(), mod.weight.double(), mod.bias.double(),
                                            mod.dilation, scale.double(), shift.double(), "relu")
    with torch.no_grad():
        for N, H, W in DCONV_SHAPES:
            x = torch.randn(N, 4, H, W)
            assert_close(run(s_sess, x)[0], ref(single, x), what=f"DirectionalConv2d {N, H, W}")
            y_h, y_v = run(p_sess, x)
            assert_close(y_h, ref(pair.horizontal, x), what=f"pair horizontal {N, H, W}")
            assert_close(y_v, ref(pair.vertical, x), what=f"pair vertical {N, H, W}")


@needs_cpp
def test_half_inputs_compute_in_float32():
    """fp16 graphs (what a GPU backend's ops export as; traced here through the fake kernels):
    criss-cross attention with its residual and carafe_fused run in float32 inside and round
    once, so they are within an fp16 rounding of the fp64 reference."""
    ops = torch.ops.armnet_ops
    q, k, v, x = (torch.randn(1, 4, 5, 6) for _ in range(4))
    gamma = torch.tensor([0.7])
    cca = export(Fn(lambda q, k, v, x, g: ops.cca_residual_forward(q, k, v, x, g, 1.0)[0]),
                 (q.half(), k.half(), v.half(), x.half(), gamma))
    f, logits = torch.randn(1, 4, 3, 4), torch.randn(1, 2 * 9 * 4, 3, 4)
    car = export(Fn(lambda f, m: ops.carafe_fused_forward(f, m, 3, 2, 2)), (f.half(), logits.half()))
    q, k, v, x, f, logits = (t.half().double() for t in (q, k, v, x, f, logits))  # the inputs ORT sees
    for got, ref in [(run(cca, *(t.half() for t in (q, k, v, x)), gamma)[0],
                      0.7 * reference.criss_cross_attention(q, k, v) + x),
                     (run(car, f.half(), logits.half())[0], reference.carafe_fused(f, logits, 3, 2, 2))]:
        assert got.dtype == torch.float16
        err = (got.double() - ref).abs().max().item()
        assert err <= 1e-3 * ref.abs().max().item(), err


@pytest.mark.parametrize("module,shape", [
    (lambda: DirectionalConv2d(4, 5, (1, 3), (1, 2)), (1, 4, 6, 6)),
    (lambda: CrissCrossAttention(8), (1, 8, 5, 5)),
    (lambda: CARAFEPack(8, 2, compressed_channels=8), (1, 8, 4, 4))])
def test_torchscript_exporter_names_the_dynamo_exporter(module, shape, tmp_path):
    with pytest.raises(RuntimeError, match=r"TorchScript-based ONNX exporter.*dynamo=True"):
        torch.onnx.export(module().eval(), (torch.randn(shape),), str(tmp_path / "m.onnx"),
                          dynamo=False)


@needs_cpp
def test_translation_table_is_the_public_route():
    """The same translations passed explicitly as custom_translation_table."""
    from armnet_ops.onnx import translation_table
    table = translation_table()
    assert torch.ops.armnet_ops.cca_forward.default in table
    m = Fn(lambda x, w: armnet_ops.directional_conv2d(x, w, dilation=(3, 1)))
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 1)
    program = torch.onnx.export(m, (x, w), dynamo=True, custom_translation_table=table, verbose=False)
    sess = ort.InferenceSession(program.model_proto.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    assert_close(run(sess, x, w)[0], reference.directional_conv2d(x.double(), w.double(), None, (3, 1)))


# ---- optional dependency ---------------------------------------------------------------------

def block(*names: str) -> str:
    """Python code that makes the named packages look absent: a None entry in sys.modules makes
    `import` raise ImportError and importlib.util.find_spec return None, as when not installed."""
    return "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names)


def test_import_armnet_ops_needs_no_onnx():
    """With onnx, onnxscript, onnx_ir and onnxruntime blocked, armnet_ops imports and runs; when
    they are installed, importing it does not import them, and the exporter's loading does."""
    code = block("onnx", "onnxscript", "onnx_ir", "onnxruntime") + """
import torch, armnet_ops
q = torch.randn(1, 2, 3, 4)
assert armnet_ops.criss_cross_attention(q, q, q).shape == q.shape
"""
    code2 = """
import sys, armnet_ops
assert not any(m.split('.')[0] in ('onnx', 'onnxscript', 'onnxruntime') for m in sys.modules), \
    sorted(m for m in sys.modules if m.startswith('onnx'))
import torch.onnx._internal.exporter._registration  # what the exporter loads: the hook fires
assert 'armnet_ops.onnx' in sys.modules
"""
    for c in (code, code2):
        r = subprocess.run([sys.executable, "-c", c], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert r.returncode == 0, r.stderr[-2000:]
