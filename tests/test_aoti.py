"""AOTInductor packages of the three ops: a small module with criss-cross attention, the
directional convolution pair and CARAFE, compiled by `armnet.export.export_aoti` (about a minute on
a 2-core CPU: the package's C++ compile), run through `load_runner` against eager.

An AOTInductor package indexes its input with the strides it was compiled with and does not check
the strides it is given, so a channels_last input (numpy's HWC -> CHW transpose of a loaded image
is one) was read as garbage: `python -m armnet export --format aoti` refused its own package
(issue 16). The full-model command is tests/test_export.py::test_export_aoti (opt-in: minutes).
"""
import numpy as np
import pytest
import torch
from torch import nn

from armnet.export import check_inputs, export_aoti, load_runner, verify
from armnet_ops._backend import EXTENSION_ERROR
from armnet_ops.nn import CARAFEPack, CrissCrossAttention, DirectionalConv2dPair

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(EXTENSION_ERROR is not None, reason="needs the C++ extension (the ops' "
                       "CPU kernels are what the package calls)"),
]
OPS = {"cca_residual_forward", "directional_conv2d_pair_forward", "carafe_fused_forward"}


class ThreeOps(nn.Module):
    """stem conv -> criss-cross attention block -> directional pair (folded BN, ReLU) -> CARAFE x2
    -> 1x1 head, the ops as ARM-Net uses them, with weights that make every op matter."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.cca = CrissCrossAttention(16)
        self.dtm = DirectionalConv2dPair(16, 8, 3, rate=2, bias=False, bn=True, activation="relu")
        self.up = CARAFEPack(16, 2, up_kernel=3, compressed_channels=8)
        self.head = nn.Conv2d(16, 2, 1)
        with torch.no_grad():
            self.cca.gamma.fill_(0.5)
            self.up.content_encoder.weight.normal_(std=0.3)  # masks far from uniform
            for bn in (self.dtm.horizontal.bn, self.dtm.vertical.bn):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        f = self.cca(self.stem(x))
        return self.head(self.up(torch.cat(self.dtm(f), 1)))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    module = ThreeOps().eval()
    example = torch.randn(2, 3, 12, 20)  # batch 2: a batch of 1 would be specialised
    path = str(tmp_path_factory.mktemp("aoti") / "three_ops.pt2")
    # dynamic batch, height and width (`export --dynamic`): one compile covers both modes
    export_aoti(module, example, path, dynamic=True)
    return module, example, path


def test_ops_are_calls_in_the_exported_graph(package):
    """The graph AOTInductor compiles holds our ops as opaque calls (the package runs them through
    its proxy executor, i.e. our C++ kernels), not as a decomposition."""
    module, example, _ = package
    ep = torch.export.export(module, (example,))
    called = {n.target._opname for n in ep.graph.nodes
              if n.op == "call_function" and getattr(n.target, "namespace", None) == "armnet_ops"}
    assert called == OPS


def test_package_matches_eager_for_each_input_layout(package):
    """Random input (contiguous and channels_last), the export check's synthetic image
    (channels_last) and, the package being dynamic, a batch of 3 at another size: logits within
    1e-4 of eager."""
    module, example, path = package
    inputs = check_inputs(example, dynamic=True)
    assert any(t.shape[2:] != example.shape[2:] for t in inputs.values())
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(1))
    inputs["random channels_last"] = x.contiguous(memory_format=torch.channels_last)
    inputs["random, a view with a storage offset"] = torch.randn(2, *example.shape[1:])[1:]
    assert any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in inputs.values())
    report = verify(module, load_runner(path, "aoti"), inputs, torch.float32)
    assert set(report) == set(inputs)
    with torch.no_grad():
        assert np.abs(module(x).numpy()).max() > 0.1, "the logits are too small to test anything"
