"""Models Kiln ships, built with onnx.helper so their making is readable and repeatable.

`mnist_cnn()` is the bundled default model (`kiln demo`): the classic Keras MNIST
CNN, Conv2D(32, 3x3, relu) → MaxPool 2x2 → Conv2D(64, 3x3, relu) → MaxPool 2x2 →
Conv2D(64, 3x3, relu) → Flatten → Dense(64, relu) → Dense(10, softmax), NCHW,
on 1x1x28x28 inputs, with Glorot-uniform weights from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DATA = Path(__file__).parent / "data"
MNIST_CNN_PATH = DATA / "mnist_cnn.onnx"


def _glorot(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def mnist_cnn(batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def conv(x: str, name: str, cin: int, cout: int) -> str:
        w = weight(f"{name}.weight", _glorot(rng, (cout, cin, 3, 3), cin * 9, cout * 9))
        b = weight(f"{name}.bias", (rng.standard_normal(cout) * 0.01).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, w, b], [f"{name}.out"], name=name, kernel_shape=[3, 3]))
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    def pool(x: str, name: str) -> str:
        nodes.append(helper.make_node("MaxPool", [x], [name], name=name, kernel_shape=[2, 2], strides=[2, 2]))
        return name

    def dense(x: str, name: str, fin: int, fout: int) -> str:
        w = weight(f"{name}.weight", _glorot(rng, (fin, fout), fin, fout))
        b = weight(f"{name}.bias", (rng.standard_normal(fout) * 0.01).astype(np.float32))
        nodes.append(helper.make_node("Gemm", [x, w, b], [f"{name}.out"], name=name))
        return f"{name}.out"

    x = pool(conv("input", "conv1", 1, 32), "pool1")
    x = pool(conv(x, "conv2", 32, 64), "pool2")
    x = conv(x, "conv3", 64, 64)
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    h = dense("flat", "dense1", 576, 64)
    nodes.append(helper.make_node("Relu", [h], ["dense1.relu"], name="dense1.relu"))
    logits = dense("dense1.relu", "dense2", 64, 10)
    nodes.append(helper.make_node("Softmax", [logits], ["probabilities"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes,
        "mnist_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="kiln")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_bundled() -> Path:
    """Regenerate the bundled file (a test checks it matches mnist_cnn())."""
    DATA.mkdir(exist_ok=True)
    MNIST_CNN_PATH.write_bytes(mnist_cnn().SerializeToString())
    return MNIST_CNN_PATH


class _OnnxBuilder:
    """A few lines per layer: nodes, initializers and fresh names for an ONNX graph."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def weight(self, hint: str, shape: tuple[int, ...], fan_in: int) -> str:
        return self.const(hint, (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def model(self, name: str, inputs: list, outputs: list, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="kiln")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _batch_input(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def mlp(batch: int = 1, sizes: tuple[int, ...] = (784, 512, 512, 10), seed: int = 0) -> onnx.ModelProto:
    """Dense layers with ReLU between them and softmax at the end."""
    b = _OnnxBuilder(seed)
    x = "input"
    for i, (fin, fout) in enumerate(zip(sizes, sizes[1:])):
        x = b.op("Gemm", [x, b.weight("w", (fin, fout), fin), b.const("b", np.zeros(fout, np.float32))])
        x = b.op("Relu", [x]) if i < len(sizes) - 2 else b.op("Softmax", [x], "probabilities", axis=-1)
    return b.model(
        "mlp",
        [_batch_input("input", [batch, sizes[0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, sizes[-1]])],
    )


def transformer_encoder(
    batch: int = 1,
    seq: int = 128,
    d_model: int = 256,
    heads: int = 4,
    ffn: int = 1024,
    layers: int = 4,
    seed: int = 0,
) -> onnx.ModelProto:
    """A stack of post-norm encoder layers as PyTorch's exporter writes them (opset 17):
    MatMul + Add for projections, Reshape/Transpose into heads, Softmax, GELU spelled
    with Erf, LayerNormalization. Reshapes copy the batch dimension (0), so any batch
    binds."""
    b = _OnnxBuilder(seed)
    dh = d_model // heads
    x = "input"

    def linear(x: str, fin: int, fout: int) -> str:
        y = b.op("MatMul", [x, b.weight("w", (fin, fout), fin)])
        return b.op("Add", [y, b.const("b", (b.rng.standard_normal(fout) * 0.02).astype(np.float32))])

    def heads_first(t: str) -> str:  # (B, S, D) → (B, H, S, dh)
        t = b.op("Reshape", [t, b.const("shape", np.array([0, 0, heads, dh], np.int64))])
        return b.op("Transpose", [t], perm=[0, 2, 1, 3])

    def layer_norm(t: str) -> str:
        return b.op(
            "LayerNormalization",
            [
                t,
                b.const("gamma", np.ones(d_model, np.float32)),
                b.const("beta", np.zeros(d_model, np.float32)),
            ],
            axis=-1,
        )

    for _ in range(layers):
        q, k, v = (heads_first(linear(x, d_model, d_model)) for _ in range(3))
        kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = b.op("Div", [b.op("MatMul", [q, kt]), b.const("scale", np.array(np.sqrt(dh), np.float32))])
        attn = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
        attn = b.op(
            "Reshape",
            [
                b.op("Transpose", [attn], perm=[0, 2, 1, 3]),
                b.const("shape", np.array([0, 0, d_model], np.int64)),
            ],
        )
        x = layer_norm(b.op("Add", [x, linear(attn, d_model, d_model)]))
        h = linear(x, d_model, ffn)
        erf = b.op("Erf", [b.op("Div", [h, b.const("sqrt2", np.array(np.sqrt(2.0), np.float32))])])
        gelu = b.op(
            "Mul",
            [
                b.op("Mul", [h, b.op("Add", [erf, b.const("one", np.array(1.0, np.float32))])]),
                b.const("half", np.array(0.5, np.float32)),
            ],
        )
        x = layer_norm(b.op("Add", [x, linear(gelu, ffn, d_model)]))
    out = b.op("Identity", [x], "output")
    return b.model(
        "transformer_encoder",
        [_batch_input("input", [batch, seq, d_model])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, seq, d_model])],
    )


def resnet18(batch: int = 1, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 (He et al.) at 224x224, with BatchNormalization nodes as exported in eval
    mode: conv7x7/2 → maxpool3x3/2 → 4 stages of 2 basic blocks → global pool → fc."""
    b = _OnnxBuilder(seed)

    def conv_bn(x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        w = b.weight("conv", (cout, cin, k, k), cin * k * k)
        y = b.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        stats = [
            b.const(n, a.astype(np.float32))
            for n, a in (
                ("gamma", b.rng.uniform(0.5, 1.5, cout)),
                ("beta", b.rng.standard_normal(cout) * 0.1),
                ("mean", b.rng.standard_normal(cout) * 0.1),
                ("var", b.rng.uniform(0.5, 1.5, cout)),
            )
        ]
        y = b.op("BatchNormalization", [y, *stats], epsilon=1e-5)
        return b.op("Relu", [y]) if relu else y

    x = conv_bn("input", 3, 64, 7, 2, True)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            y = conv_bn(conv_bn(x, cin, cout, 3, s, True), cout, cout, 3, 1, False)
            shortcut = conv_bn(x, cin, cout, 1, s, False) if (s != 1 or cin != cout) else x
            x = b.op("Relu", [b.op("Add", [y, shortcut])])
            cin = cout
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    logits = b.op(
        "Gemm",
        [x, b.weight("fc", (classes, 512), 512), b.const("fc_b", np.zeros(classes, np.float32))],
        "logits",
        transB=1,
    )
    return b.model(
        "resnet18",
        [_batch_input("input", [batch, 3, 224, 224])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [batch, classes])],
    )
