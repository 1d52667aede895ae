"""Models written in PyTorch and exported with torch.onnx, as users bring them.

torch is optional (`pip install torch==2.13.0`); only this module imports it. The
TorchScript exporter (`dynamo=False`) is used: it needs nothing beyond torch, and it
writes the Shape → Gather → Concat → Reshape chains that Kiln folds at import. A
named sequence axis goes through torch.export instead (`pip install onnxscript`).

    export(name, batch) -> onnx.ModelProto     # name in MODELS
    export(name, 2, dynamic=True)              # the batch axis named N
    export(name, 2, True, sequence=True)       # and the sequence axis named S
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable

import onnx

OPSET = 17
SYMBOLIC_OPSET = 18  # the lowest torch.export's ONNX translation writes


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("frontends.zoo.torch_models needs PyTorch: pip install torch==2.13.0") from e
    return torch


def mlp():
    """784-512-512-10 with ReLU."""
    nn = _torch().nn
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    ), (784,)


def mnist_cnn():
    """The Keras MNIST example's CNN: two conv/pool stages, dropout, a softmax classifier."""
    nn = _torch().nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(1600, 10),
        nn.Softmax(dim=1),
    ), (1, 28, 28)


def resnet18():
    """ResNet-18 as in the paper (basic blocks 2-2-2-2), written out; no torchvision."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    model = nn.Sequential(*layers)
    _randomize_batchnorm(model)
    return model, (3, 224, 224)


def transformer():
    """4 encoder layers: d_model 256, 4 heads, FFN 1024 with GELU, post-LayerNorm; 128 tokens."""
    nn = _torch().nn
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, activation="gelu", batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), (128, 256)


def lstm():
    """One LSTM layer, 128 inputs → 256 hidden over 64 steps; returns every step's output."""
    nn = _torch().nn

    class Sequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(128, 256, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    return Sequence(), (64, 128)


MODELS: dict[str, Callable] = {
    "mlp": mlp,
    "mnist_cnn": mnist_cnn,
    "resnet18": resnet18,
    "transformer": transformer,
    "lstm": lstm,
}


def _randomize_batchnorm(model) -> None:
    """Fresh BatchNorm layers are the identity; trained ones are not."""
    torch = _torch()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def export(
    name: str, batch: int, seed: int = 0, dynamic: bool = False, sequence: bool = False
) -> onnx.ModelProto:
    """Build model `name` with seeded weights, in inference mode, and export it for
    inputs of shape (batch, *input_shape); `dynamic`: with the batch axis of the input
    and the output named N (any size); `sequence`: axis 1 (the transformer's and the
    LSTM's steps) named S, through torch.export (see _export_symbolic)."""
    torch = _torch()
    torch.manual_seed(seed)
    model, input_shape = MODELS[name]()
    model.eval()
    example = torch.randn(batch, *input_shape)
    # the fused inference kernel of nn.TransformerEncoderLayer has no ONNX export
    torch.backends.mha.set_fastpath_enabled(False)
    axes = {0: "N"} if dynamic else {}
    if sequence:
        return _export_symbolic(model, example, {**axes, 1: "S"})
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["input"],
            output_names=["output"],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={"input": axes, "output": axes} if axes else None,
        )
    return onnx.load_from_string(buffer.getvalue())


def _export_symbolic(model, example, axes: dict[int, str]) -> onnx.ModelProto:
    """Export through torch.export (needs onnxscript), which keeps every named axis a
    symbol: the TorchScript tracer writes nn.MultiheadAttention's sequence length into a
    Reshape as a number, so its file only runs at the traced length."""
    torch = _torch()
    dims = {axis: torch.export.Dim(name) for axis, name in axes.items()}
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["input"],
            output_names=["output"],
            opset_version=SYMBOLIC_OPSET,
            dynamo=True,
            dynamic_shapes=(dims,),
            verbose=False,
        )
    return program.model_proto
