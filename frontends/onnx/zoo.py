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
