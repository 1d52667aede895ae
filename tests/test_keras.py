"""The Keras-compatible frontend: tutorials run with only their imports changed, and
training matches real Keras 3 (torch backend) epoch by epoch from the same weights."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from frontends import keras
from frontends.keras import layers
from frontends.keras.layers import Dense
from frontends.keras.models import Sequential
from frontends.keras.optimizers import Adam


def _real_keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip("torch")
    real = pytest.importorskip("keras")
    if real.backend.backend() != "torch":
        pytest.skip("real Keras is loaded with another backend")
    return real


# ---------------------------------------------------------------- parity with real Keras


@pytest.fixture
def parity_rng(request) -> np.random.Generator:
    """Fixed data and fixed initial weights per test (seeded by the test's name). Training
    is chaotic at float32 rounding: about once in tens of runs a ReLU input within
    rounding of zero takes the other branch in one framework, and Adam carries the
    difference into the weights (predictions then differ by ~1e-4 while the loss
    history still agrees to 1e-7). Fixed seeds keep the comparison reproducible."""
    import zlib

    seed = zlib.crc32(request.node.name.encode())
    _real_keras().utils.set_random_seed(seed)
    return np.random.default_rng(seed)


def _parity(build, x, y, epochs=5, batch_size=32, rtol=1e-4, predict_atol=1e-4):
    """Same initial weights, shuffle=False: the per-epoch history and the predictions
    after training must match real Keras."""
    real = _real_keras()
    reference, ours = build(real), build(keras)
    ours.set_weights(reference.get_weights())
    expected = reference.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False).history
    got = ours.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False).history
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=rtol, err_msg=key)
    expected, got = reference.predict(x, verbose=0), ours.predict(x)
    for e, g in zip(*(p if isinstance(p, list) else [p] for p in (expected, got)), strict=True):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=predict_atol)


def test_linear_regression_sgd_mse(parity_rng):
    x = parity_rng.standard_normal((200, 3)).astype(np.float32)
    y = x @ np.array([1.5, -2.0, 0.5], np.float32) + 0.3

    def build(k):
        model = k.Sequential([k.Input((3,)), k.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    _parity(build, x, y)


def test_mlp_adam_sparse_categorical_crossentropy(parity_rng):
    x = parity_rng.standard_normal((300, 32)).astype(np.float32)
    y = x[:, :10].argmax(axis=1)

    def build(k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # input_shape= on the first layer, as older tutorials write it
            model = k.Sequential(
                [
                    k.layers.Dense(64, activation="relu", input_shape=(32,)),
                    k.layers.Dense(64, activation="relu"),
                    k.layers.Dense(10, activation="softmax"),
                ]
            )
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    _parity(build, x, y)


@pytest.mark.parametrize("optimizer", ["rmsprop", "adagrad", "adamw"])
def test_other_optimizers(optimizer, parity_rng):
    x = parity_rng.standard_normal((128, 8)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[(x[:, :4] ** 2).argmax(axis=1)]

    def build(k):
        model = k.Sequential(
            [k.Input((8,)), k.layers.Dense(16, activation="tanh"), k.layers.Dense(4, activation="softmax")]
        )
        model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy", "mae"])
        return model

    _parity(build, x, y, epochs=3)


def test_sgd_momentum_nesterov_and_huber(parity_rng):
    x = parity_rng.standard_normal((96, 5)).astype(np.float32)
    y = (x[:, :2].sum(axis=1, keepdims=True) * 3).astype(np.float32)

    def build(k):
        model = k.Sequential([k.Input((5,)), k.layers.Dense(8, activation="sigmoid"), k.layers.Dense(1)])
        model.compile(
            optimizer=k.optimizers.SGD(0.05, momentum=0.9, nesterov=True), loss="huber", metrics=["mse"]
        )
        return model

    _parity(build, x, y, epochs=3)


def test_mlp_with_batch_normalization_and_dropout(parity_rng):
    """Training with BatchNormalization (batch statistics, moving averages updated in the
    step) and Dropout(0.0); with Dropout(0.5), inference (predict, evaluate) only: its
    training masks are each framework's own random draws."""
    x = (parity_rng.standard_normal((160, 16)) * 3 + 1).astype(np.float32)
    y = x[:, :4].argmax(axis=1)

    def build(rate):
        def make(k):
            model = k.Sequential(
                [
                    k.Input((16,)),
                    k.layers.Dense(32),
                    k.layers.BatchNormalization(),
                    k.layers.Activation("relu"),
                    k.layers.Dropout(rate),
                    k.layers.Dense(4, activation="softmax"),
                ]
            )
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            return model

        return make

    _parity(build(0.0), x, y, epochs=3)
    real = _real_keras()
    reference, ours = build(0.5)(real), build(0.5)(keras)
    moved = [w * 1.1 + 0.05 for w in reference.get_weights()]  # moving statistics away from 0 / 1
    reference.set_weights(moved)
    ours.set_weights(moved)
    np.testing.assert_allclose(ours.predict(x), reference.predict(x, verbose=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.evaluate(x, y, verbose=0), reference.evaluate(x, y, verbose=0), rtol=1e-4)


@pytest.mark.slow
def test_mnist_cnn_adam(parity_rng):
    """The classic Keras MNIST CNN (Dropout left out: its masks come from each
    framework's own random stream), on structured synthetic images."""
    x = parity_rng.random((256, 28, 28, 1)).astype(np.float32)
    y = (x[:, :14, :14, 0].mean(axis=(1, 2)) * 40).astype(np.int64) % 10

    def build(k):
        model = k.Sequential(
            [
                k.Input((28, 28, 1)),
                k.layers.Conv2D(32, (3, 3), activation="relu"),
                k.layers.MaxPooling2D((2, 2)),
                k.layers.Conv2D(64, (3, 3), activation="relu"),
                k.layers.MaxPooling2D((2, 2)),
                k.layers.Flatten(),
                k.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    _parity(build, x, y, epochs=3)


@pytest.mark.slow
def test_lstm_rmsprop_mse(parity_rng):
    x = parity_rng.standard_normal((96, 8, 4)).astype(np.float32)
    y = x[:, :, 0].sum(axis=1, keepdims=True)

    def build(k):
        model = k.Sequential([k.Input((8, 4)), k.layers.LSTM(32), k.layers.Dense(1)])
        model.compile(optimizer="rmsprop", loss="mse")
        return model

    _parity(build, x, y)


@pytest.mark.slow
def test_gru_sgd_momentum_categorical_crossentropy(parity_rng):
    x = parity_rng.standard_normal((96, 8, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[(x[:, :, :3].sum(axis=1)).argmax(axis=1)]

    def build(k):
        model = k.Sequential([k.Input((8, 4)), k.layers.GRU(16), k.layers.Dense(3, activation="softmax")])
        model.compile(
            optimizer=k.optimizers.SGD(momentum=0.9), loss="categorical_crossentropy", metrics=["accuracy"]
        )
        return model

    _parity(build, x, y)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", ["simple_rnn_sequences", "gru_reset_before", "lstm_backwards", "gru_backwards_sequences"]
)
def test_recurrent_variants(variant, parity_rng):
    x = parity_rng.standard_normal((64, 6, 3)).astype(np.float32)
    y = x[:, :, :2].mean(axis=1)

    def build(k):
        if variant == "simple_rnn_sequences":
            body = [k.layers.SimpleRNN(8, return_sequences=True), k.layers.Flatten()]
        elif variant == "gru_reset_before":
            body = [k.layers.GRU(8, reset_after=False)]
        elif variant == "lstm_backwards":
            body = [k.layers.LSTM(8, go_backwards=True)]
        else:  # a layer before it trains through the reversed steps
            body = [k.layers.Conv1D(4, 1), k.layers.GRU(8, go_backwards=True, return_sequences=True),
                    k.layers.Flatten()]  # fmt: skip
        model = k.Sequential([k.Input((6, 3)), *body, k.layers.Dense(2)])
        model.compile(optimizer="adam", loss="mae")
        return model

    _parity(build, x, y, epochs=3)


@pytest.mark.parametrize("padding", ["valid", "same", "causal"])
def test_conv1d_layer_normalization(padding, parity_rng):
    x = parity_rng.standard_normal((64, 12, 3)).astype(np.float32)
    y = x[:, :, 0].mean(axis=1, keepdims=True)

    def build(k):
        model = k.Sequential(
            [
                k.Input((12, 3)),
                k.layers.Conv1D(5, 3, padding=padding, activation="relu"),
                k.layers.LayerNormalization(),
                k.layers.Flatten(),
                k.layers.Dense(1),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
        return model

    _parity(build, x, y, epochs=2)


def test_strided_same_conv_average_and_global_average_pooling(parity_rng):
    x = parity_rng.random((32, 8, 8, 2)).astype(np.float32)
    y = parity_rng.integers(0, 2, 32)

    def build(k):
        model = k.Sequential(
            [
                k.Input((8, 8, 2)),
                k.layers.Conv2D(4, 3, strides=2, padding="same"),
                k.layers.AveragePooling2D((3, 3), strides=(1, 1), padding="same"),
                k.layers.GlobalAveragePooling2D(),
                k.layers.Dense(2, activation="softmax"),
            ]
        )
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        return model

    _parity(build, x, y, epochs=2)


@pytest.mark.slow
def test_embedding_lstm(parity_rng):
    x = parity_rng.integers(0, 50, (96, 7))
    y = (x % 3 == 0).sum(axis=1, keepdims=True).astype(np.float32)

    def build(k):
        model = k.Sequential(
            [k.Input((7,), dtype="int64"), k.layers.Embedding(50, 6), k.layers.LSTM(8), k.layers.Dense(1)]
        )
        model.compile(optimizer="adam", loss="mse")
        return model

    _parity(build, x, y, epochs=3)


# ---------------------------------------------------------------- tutorials, imports changed only


def test_tutorial_linear_regression_with_sgd():
    model = keras.Sequential([keras.layers.Dense(units=1, input_shape=[1])])
    model.compile(optimizer="sgd", loss="mean_squared_error")
    xs = np.array([-1.0, 0.0, 1.0, 2.0, 3.0, 4.0], dtype=float)
    ys = np.array([-3.0, -1.0, 1.0, 3.0, 5.0, 7.0], dtype=float)
    model.fit(xs, ys, epochs=500, verbose=0)
    assert abs(float(model.predict(np.array([10.0]))[0, 0]) - 19.0) < 0.1


def test_tutorial_dense_64_64_10_with_adam(rng):
    model = Sequential()
    model.add(Dense(64, activation="relu", input_shape=(20,)))
    model.add(Dense(64, activation="relu"))
    model.add(Dense(10, activation="softmax"))
    model.compile(optimizer=Adam(), loss="categorical_crossentropy", metrics=["accuracy"])
    x = rng.standard_normal((256, 20)).astype(np.float32)
    y = np.eye(10)[x[:, :10].argmax(axis=1)]
    history = model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    assert history.history["accuracy"][-1] > 0.8
    loss, accuracy = model.evaluate(x, y, verbose=0)
    assert accuracy > 0.8 and loss < history.history["loss"][0]


def test_tutorial_add_with_input_dim(rng):
    model = Sequential()
    model.add(Dense(units=64, activation="relu", input_dim=100))
    model.add(Dense(units=10, activation="softmax"))
    model.compile(loss="categorical_crossentropy", optimizer="sgd", metrics=["accuracy"])
    x = rng.standard_normal((64, 100)).astype(np.float32)
    y = np.eye(10)[rng.integers(0, 10, 64)]
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert model.predict(x[:5]).shape == (5, 10)


def test_tutorial_rmsprop_optimizer_on_a_list():
    """TF1-era: keras.optimizers.RMSpropOptimizer(0.001), fit on a plain list."""
    model = keras.Sequential([keras.layers.Dense(units=1, input_shape=[1])])
    with pytest.warns(DeprecationWarning, match="RMSpropOptimizer"):
        optimizer = keras.optimizers.RMSpropOptimizer(0.001)
    model.compile(optimizer=optimizer, loss="mse")
    before = model.get_weights()[0].copy()
    model.fit(x=[1, 2, 3, 4], y=[2, 4, 6, 8], epochs=5, verbose=0)
    assert model.predict([5]).shape == (1, 1)
    assert not np.array_equal(before, model.get_weights()[0])


def test_tutorial_mnist_cnn_runs(rng):
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    x = rng.random((96, 28, 28, 1)).astype(np.float32)
    y = np.eye(10)[rng.integers(0, 10, 96)]
    history = model.fit(x, y, batch_size=32, epochs=2, validation_split=0.25, verbose=0)
    assert list(history.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]


# ---------------------------------------------------------------- behaviour


def test_dropout_trains_with_masks_and_predicts_without(rng):
    model = keras.Sequential([keras.Input((16,)), layers.Dropout(0.5), layers.Dense(4)])
    model.compile(optimizer="sgd", loss="mse")
    x = rng.standard_normal((8, 16)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), x @ model.get_weights()[0], rtol=1e-5, atol=1e-6)


def test_set_random_seed_makes_training_repeatable(rng):
    x = rng.standard_normal((64, 6)).astype(np.float32)
    y = rng.standard_normal((64, 1)).astype(np.float32)

    def run():
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [keras.Input((6,)), layers.Dense(8, activation="relu"), layers.Dropout(0.3), layers.Dense(1)]
        )
        model.compile(optimizer="adam", loss="mse")
        return model.fit(x, y, epochs=3, batch_size=16, verbose=0).history["loss"], model.get_weights()

    (loss_a, w_a), (loss_b, w_b) = run(), run()
    assert loss_a == loss_b and all(np.array_equal(a, b) for a, b in zip(w_a, w_b))


def test_early_stopping_and_learning_rate_schedule(rng):
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = rng.standard_normal((64, 1)).astype(np.float32)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # lr 0: the loss never improves
    seen = []
    history = model.fit(
        x,
        y,
        epochs=10,
        verbose=0,
        shuffle=False,  # the same batches every epoch: the same loss, to the last bit
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="loss", patience=2),
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: (seen.append(lr), lr)[1]),
        ],
    )
    assert len(history.history["loss"]) == 3 and history.history["learning_rate"] == [0.0] * 3
    assert seen == [0.0] * 3


def test_progress_bar_format(rng, capsys):
    model = keras.Sequential([keras.Input((4,)), layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(rng.standard_normal((40, 4)).astype(np.float32), rng.integers(0, 2, 40), epochs=2, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 1/2\n" in out and "Epoch 2/2\n" in out
    assert "\x1b[1m2/2\x1b[0m" in out and " - accuracy: " in out and " - loss: " in out


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"Argument\(s\) not recognized: \{'lr': 0.1\}"):
        keras.optimizers.Adam(lr=0.1)
    model = keras.Sequential([keras.Input((3,)), layers.Dense(1)])
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(np.zeros((4, 3), np.float32), np.zeros(4, np.float32))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"expects \(batch, 3\)"):
        model.fit(np.zeros((4, 5), np.float32), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="nb_epoch"):
        model.fit(np.zeros((4, 3), np.float32), np.zeros(4, np.float32), nb_epoch=3)


def test_summary_matches_keras_layout():
    """A small CNN's summary after a fit, verbatim as Keras prints it."""
    from frontends.keras import base_layer

    k = keras
    for prefix in ("conv2d", "max_pooling2d", "dense", "flatten", "sequential"):
        base_layer._counters.pop(prefix, None)  # names as in a fresh process
    model = k.Sequential(
        [
            k.Input((28, 28, 1)),
            k.layers.Conv2D(32, (3, 3), activation="relu"),
            k.layers.MaxPooling2D((2, 2)),
            k.layers.Conv2D(64, (3, 3), activation="relu"),
            k.layers.MaxPooling2D((2, 2)),
            k.layers.Conv2D(64, (3, 3), activation="relu"),
            k.layers.Flatten(),
            k.layers.Dense(64, activation="relu"),
            k.layers.Dense(10),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((32, 28, 28, 1), np.float32), np.zeros((32, 10), np.float32), verbose=0)
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert text.splitlines()[0] == 'Model: "sequential"'
    assert "│ conv2d_1 (Conv2D)               │ (None, 11, 11, 64)     │        18,496 │" in text
    assert "│ flatten (Flatten)               │ (None, 576)            │             0 │" in text
    assert text.endswith(
        " Total params: 279,968 (1.07 MB)\n Trainable params: 93,322 (364.54 KB)\n"
        " Non-trainable params: 0 (0.00 B)\n Optimizer params: 186,646 (729.09 KB)"
    )


# ---------------------------------------------------------------- saving


def _small_cnn(k):
    model = k.Sequential(
        [
            k.Input((10, 10, 1)),
            k.layers.Conv2D(4, (3, 3), activation="relu", padding="same"),
            k.layers.MaxPooling2D(),
            k.layers.Flatten(),
            k.layers.Dense(8),
            k.layers.BatchNormalization(),
            k.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_keras_files_load_both_ways(tmp_path, rng):
    pytest.importorskip("h5py")
    real = _real_keras()
    x = rng.random((64, 10, 10, 1)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    theirs = _small_cnn(real)
    theirs.fit(x, y, epochs=2, verbose=0)
    theirs.save(tmp_path / "real.keras")
    loaded = keras.models.load_model(tmp_path / "real.keras")
    np.testing.assert_allclose(loaded.predict(x), theirs.predict(x, verbose=0), rtol=1e-4, atol=1e-6)
    assert loaded.optimizer.iterations == 4

    ours = _small_cnn(keras)
    ours.fit(x, y, epochs=2, verbose=0)
    ours.save(tmp_path / "kiln.keras")
    back = real.models.load_model(tmp_path / "kiln.keras")
    np.testing.assert_allclose(back.predict(x, verbose=0), ours.predict(x), rtol=1e-4, atol=1e-6)
    # the optimizer state came along: one more epoch agrees
    again = keras.models.load_model(tmp_path / "kiln.keras")
    a = back.fit(x, y, epochs=1, verbose=0, shuffle=False).history["loss"]
    b = again.fit(x, y, epochs=1, verbose=0, shuffle=False).history["loss"]
    np.testing.assert_allclose(b, a, rtol=1e-4)


def test_recurrent_model_saved_by_kiln_loads_in_keras(tmp_path, rng):
    pytest.importorskip("h5py")
    real = _real_keras()
    model = keras.Sequential([keras.Input((5, 3)), layers.LSTM(4), layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.save(tmp_path / "lstm.keras")
    x = rng.random((4, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(
        real.models.load_model(tmp_path / "lstm.keras").predict(x, verbose=0),
        model.predict(x),
        rtol=1e-5,
        atol=1e-6,
    )


def test_weights_files_and_atomic_save(tmp_path, rng, monkeypatch):
    pytest.importorskip("h5py")
    model = _small_cnn(keras)
    x = rng.random((8, 10, 10, 1)).astype(np.float32)
    model.save_weights(tmp_path / "w.weights.h5")
    other = _small_cnn(keras)
    other.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(other.predict(x), model.predict(x))
    model.save(tmp_path / "m.keras")
    good = (tmp_path / "m.keras").read_bytes()
    import frontends.keras.saving as saving

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "_write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "m.keras")
    assert (tmp_path / "m.keras").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "w.weights.h5"]
    with pytest.raises(ValueError, match="must end in `.keras`"):
        model.save(tmp_path / "m.h5")


def _configurable_layers(k) -> list:
    """One of every Kiln layer, named, with arguments away from the defaults where Kiln has them."""
    L = k.layers  # noqa: N806 - Keras's namespace
    return [
        L.Dense(3, name="dense_a"),
        L.Dense(4, activation="relu", use_bias=False, kernel_initializer="he_normal", name="dense_b"),
        L.Embedding(10, 4, embeddings_initializer="glorot_uniform", name="embedding"),
        L.Flatten(name="flatten"),
        L.Reshape((2, -1), name="reshape"),
        L.Activation("tanh", name="activation"),
        L.Dropout(0.3, seed=7, name="dropout"),
        L.BatchNormalization(momentum=0.9, epsilon=1e-5, center=False, name="batch_norm"),
        L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv2d"),
        L.MaxPooling2D(name="max_pool"),
        L.AveragePooling2D(3, 2, padding="same", name="avg_pool"),
        L.Conv1D(4, 3, padding="causal", dilation_rate=2, bias_initializer="ones", name="conv1d"),
        L.GlobalAveragePooling2D(name="gap"),
        L.LayerNormalization(epsilon=1e-5, scale=False, name="layer_norm"),
        L.Add(name="add"),
        L.Concatenate(axis=1, name="concatenate"),
        L.SimpleRNN(4, activation="relu", return_sequences=True, name="simple_rnn"),
        L.LSTM(
            4, return_state=True, unit_forget_bias=False, recurrent_initializer="glorot_uniform", name="lstm"
        ),
        L.GRU(4, reset_after=False, go_backwards=True, recurrent_activation="tanh", name="gru"),
        L.InputLayer(shape=(3, 4), name="input"),
    ]


def _as_json(config: dict) -> dict:
    import json

    return json.loads(json.dumps(config))


def test_layers_describe_themselves_as_keras_does():
    """get_config is Keras's config, key for key; from_config builds the layer back from
    Kiln's config and from Keras's."""
    real = _real_keras()
    for ours, theirs in zip(_configurable_layers(keras), _configurable_layers(real), strict=True):
        expected = _as_json(theirs.get_config())
        assert _as_json(ours.get_config()) == expected, ours.name
        assert _as_json(type(ours).from_config(ours.get_config()).get_config()) == expected, ours.name
        assert _as_json(type(ours).from_config(expected).get_config()) == expected, ours.name


def test_initializers_describe_themselves_as_keras_does():
    real = _real_keras()
    for name in keras.initializers.NAMES:
        expected = _as_json(real.saving.serialize_keras_object(real.initializers.get(name)))
        assert _as_json(keras.initializers.serialize(keras.initializers.get(name))) == expected, name
        assert keras.initializers.get(expected).get_config() == expected["config"], name


def _described_models(k) -> list:
    L = k.layers  # noqa: N806 - Keras's namespace
    images = k.Sequential(
        [k.Input((8, 8, 2), name="image"), L.Conv2D(2, 3, name="conv"), L.MaxPooling2D(name="pool"),
         L.AveragePooling2D(1, name="avg"), L.Dropout(0.1, name="drop"), L.Activation("relu", name="act"),
         L.BatchNormalization(name="bn"), L.LayerNormalization(name="ln"), L.Reshape((-1, 2), name="rows"),
         L.Conv1D(2, 1, name="conv1d"), L.GRU(2, return_sequences=True, name="gru"), L.Flatten(name="flat"),
         L.Dense(2, name="head")],
        name="images",
    )  # fmt: skip
    words = k.Sequential([k.Input((7,), dtype="int64", name="words"), L.Embedding(9, 3, name="embed"),
                          L.LSTM(4, name="lstm"), L.Dense(2, name="head")], name="words")  # fmt: skip
    inputs = [k.Input((5, 3), name="left"), k.Input((4,), name="right")]
    sequence, h, c = L.LSTM(4, return_sequences=True, return_state=True, name="rnn")(inputs[0])
    shared = L.Dense(4, name="shared")
    joined = L.Concatenate(name="join")([shared(h), shared(inputs[1]), c])
    normalized = L.BatchNormalization(name="norm")(L.Dropout(0.5, name="drop")(joined))
    outputs = [L.Dense(1, name="out")(normalized), L.Flatten(name="flat")(sequence)]
    return [images, words, k.Model(inputs, outputs, name="functional_model")]


def test_models_describe_themselves_as_keras_does():
    real = _real_keras()
    for ours, theirs in zip(_described_models(keras), _described_models(real), strict=True):
        expected = _as_json(theirs.get_config())
        assert _as_json(ours.get_config()) == expected, ours.name
        assert _as_json(type(ours).from_config(expected).get_config()) == expected, ours.name


def test_config_options_kiln_lacks():
    """A Keras option Kiln has at one value only is refused at another; one only training
    reads (a regularizer) is left unread, so the model still loads for inference."""
    config = layers.Conv2D(4, 3, name="c").get_config()
    with pytest.raises(ValueError, match="data_format='channels_first' is not supported"):
        layers.Conv2D.from_config({**config, "data_format": "channels_first"})
    regularized = {**config, "kernel_regularizer": {"class_name": "L2", "config": {"l2": 0.01}}}
    assert layers.Conv2D.from_config(regularized).get_config() == config
    with pytest.raises(ValueError, match="not supported in recurrent layers"):
        layers.LSTM(4, activation="softmax")


def test_models_and_saving_import_each_other_not():
    """saving reads and writes the file format; models build themselves from configs."""
    import ast
    from pathlib import Path

    package = Path(keras.__file__).parent
    for module, other in (("models", "saving"), ("saving", "models")):
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert f"frontends.keras.{other}" not in imported and other not in names, module


def test_export_gives_a_library_with_the_c_abi(tmp_path, rng):
    from runtime import load

    model = keras.Sequential([keras.Input((6,)), layers.Dense(8, activation="relu"), layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    x = rng.standard_normal((32, 6)).astype(np.float32)
    model.fit(x, rng.standard_normal((32, 3)).astype(np.float32), verbose=0)
    so = model.export(tmp_path / "mlp.so", batch_size=4)
    assert (tmp_path / "mlp.h").read_text().count("mlp_run") >= 1
    np.testing.assert_allclose(load(so)(x[:4]), model.predict(x[:4]), rtol=1e-5, atol=1e-6)


def test_model_checkpoint_keeps_the_best(tmp_path, rng):
    pytest.importorskip("h5py")
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = x[:, :1] * 2
    model = keras.Sequential([keras.Input((4,)), layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    saved = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved.append(
                (tmp_path / "best.keras").stat().st_mtime_ns if (tmp_path / "best.keras").exists() else None
            )

    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best.keras"), monitor="loss", save_best_only=True
    )
    model.fit(x, y, epochs=3, verbose=0, callbacks=[checkpoint, Spy()])
    assert None not in saved and checkpoint.best is not None
    best = keras.models.load_model(tmp_path / "best.keras")
    np.testing.assert_allclose(
        best.predict(x), model.predict(x), rtol=1e-5, atol=1e-6
    )  # the loss fell each epoch
    with pytest.raises(ValueError, match="must end in `.keras`"):
        keras.callbacks.ModelCheckpoint("model.h5")


def test_functional_model_with_branches(parity_rng):
    """keras.Model(inputs, outputs): a residual block (Add) and two branches joined
    by Concatenate, trained against real Keras."""
    x = parity_rng.standard_normal((96, 12)).astype(np.float32)
    y = x[:, :3].argmax(axis=1)

    def build(k):
        inputs = k.Input((12,))
        h = k.layers.Dense(16, activation="relu")(inputs)
        residual = k.layers.Add()([h, k.layers.Dense(16, activation="tanh")(h)])
        joined = k.layers.Concatenate()([residual, k.layers.Dense(4)(inputs)])
        outputs = k.layers.Dense(3, activation="softmax")(joined)
        model = k.Model(inputs=inputs, outputs=outputs)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    _parity(build, x, y, epochs=3)
    model = build(keras)
    assert [type(layer).__name__ for layer in model.layers][:2] == ["InputLayer", "Dense"]
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert " (Concatenate) " in text and "(None, 20)" in text and "input_layer" in text


def _two_in_two_out(k, metrics=None, **compile_args):
    """Two inputs joined, a shared trunk, a regression head and a classification head."""
    a, b = k.Input((6,), name="numbers"), k.Input((3,), name="extra")
    trunk = k.layers.Dense(12, activation="relu", name="trunk")(k.layers.Concatenate(name="join")([a, b]))
    regression = k.layers.Dense(2, name="amount")(trunk)
    deeper = k.layers.Dense(8, activation="tanh", name="deeper")(trunk)
    classes = k.layers.Dense(3, activation="softmax", name="kind")(deeper)
    model = k.Model([a, b], [regression, classes], name="two_heads")
    model.compile(**{"optimizer": "adam", **compile_args}, metrics=metrics)
    return model


def _two_in_two_out_data(rng, n=80):
    x = [rng.standard_normal((n, 6)).astype(np.float32), rng.standard_normal((n, 3)).astype(np.float32)]
    y = [np.stack([x[0][:, 0] + x[1][:, 1], x[0][:, 2]], axis=1), x[0][:, 3:6].argmax(axis=1)]
    return x, y


def test_functional_several_inputs_and_outputs(parity_rng):
    """Per-output losses with weights, metrics per output, history keys and evaluate's
    list in Keras's order, predict giving a list."""
    x, y = _two_in_two_out_data(parity_rng)

    def build(k):
        return _two_in_two_out(
            k, loss=["mse", "sparse_categorical_crossentropy"], loss_weights=[0.5, 2.0],
            metrics=[["mae"], ["accuracy"]],
        )  # fmt: skip

    _parity(build, x, y, epochs=3, batch_size=16)
    real = _real_keras()
    reference, ours = build(real), build(keras)
    ours.set_weights(reference.get_weights())
    expected = reference.fit(x, y, epochs=2, batch_size=16, validation_split=0.25, verbose=0, shuffle=False)
    got = ours.fit(x, y, epochs=2, batch_size=16, validation_split=0.25, verbose=0, shuffle=False)
    assert list(got.history) == list(expected.history)
    for key, values in expected.history.items():
        np.testing.assert_allclose(got.history[key], values, rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(ours.evaluate(x, y), reference.evaluate(x, y, verbose=0), rtol=1e-4)


def test_functional_data_by_name_and_one_loss_for_every_output(parity_rng):
    x, y = _two_in_two_out_data(parity_rng)
    y_by_name = {"amount": y[0], "kind": np.eye(3, dtype=np.float32)[y[1]]}
    x_by_name = {"numbers": x[0], "extra": x[1]}
    real = _real_keras()
    reference, ours = _two_in_two_out(real, loss="mse"), _two_in_two_out(keras, loss="mse")
    ours.set_weights(reference.get_weights())
    expected = reference.fit(x_by_name, y_by_name, epochs=2, verbose=0, shuffle=False).history
    got = ours.fit(x_by_name, y_by_name, epochs=2, verbose=0, shuffle=False).history
    assert list(got) == list(expected) == ["amount_loss", "kind_loss", "loss"]
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)


def test_functional_export_names_inputs_and_outputs(tmp_path, rng):
    from runtime import load

    x, _ = _two_in_two_out_data(rng, 4)
    model = _two_in_two_out(keras, loss="mse")
    header = model.export(tmp_path / "heads.so", batch_size=4).with_suffix(".h").read_text()
    assert "input 1: extra  float32[4, 3]" in header and "output 1: kind  float32[4, 3]" in header
    for got, expected in zip(load(tmp_path / "heads.so")(*x), model.predict(x), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_functional_errors_name_the_inputs_and_outputs(rng):
    x, y = _two_in_two_out_data(rng, 8)
    model = _two_in_two_out(keras, loss=["mse", "sparse_categorical_crossentropy"])
    with pytest.raises(ValueError, match=r"has 2 \(numbers, extra\); pass a list of 2 arrays"):
        model.fit(x[0], y, verbose=0)
    with pytest.raises(ValueError, match=r"no data for \['extra'\]"):
        model.predict({"numbers": x[0]})
    with pytest.raises(ValueError, match="one entry per output"):
        _two_in_two_out(keras, loss="mse", metrics=["accuracy"])
    with pytest.raises(ValueError, match=r"\['speed'\] are not outputs"):
        _two_in_two_out(keras, loss={"speed": "mse"})
    with pytest.raises(ValueError, match=r"Expected keys \['amount', 'kind'\] in loss dict"):
        _two_in_two_out(keras, loss={"kind": "mse"})


@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")  # Keras, on the untrained head
def test_functional_output_without_a_loss(parity_rng):
    """An output with loss None is predicted but not trained against: Keras then logs
    no per-output loss (only one output has one), its metrics keep their prefix, and
    the head no loss reaches is left alone (with a warning), even by AdamW's decay."""
    x, y = _two_in_two_out_data(parity_rng)

    def build(k):
        model = _two_in_two_out(
            k, loss=[None, "sparse_categorical_crossentropy"], metrics={"kind": "accuracy"}
        )
        model.compile(
            optimizer="adamw", loss=[None, "sparse_categorical_crossentropy"], metrics={"kind": "accuracy"}
        )
        return model

    real = _real_keras()
    reference, ours = build(real), build(keras)
    ours.set_weights(reference.get_weights())
    amount = next(layer for layer in ours.layers if layer.name == "amount")
    untrained = amount.get_weights()
    expected = reference.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False).history
    with pytest.warns(
        UserWarning, match=r"Gradients do not exist for variables \['amount/kernel', 'amount/bias'\]"
    ):
        got = ours.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False).history
    assert list(got) == list(expected) == ["kind_accuracy", "loss"]
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)
    for mine, theirs in zip(ours.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-6)
    for now, before in zip(amount.get_weights(), untrained, strict=True):
        np.testing.assert_array_equal(now, before)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_return_state(cell, parity_rng):
    """An RNN's final states as outputs of their own (return_state), used downstream."""
    x = parity_rng.standard_normal((48, 5, 3)).astype(np.float32)
    y = [x.sum(axis=(1, 2))[:, None], x[:, -1, :2]]

    def build(k):
        inputs = k.Input((5, 3))
        sequence, *states = getattr(k.layers, cell)(4, return_sequences=True, return_state=True)(inputs)
        joined = k.layers.Concatenate()(states) if len(states) > 1 else states[0]
        last = k.layers.Dense(1, name="last")(joined)
        model = k.Model(inputs, [last, k.layers.Dense(2, name="whole")(k.layers.Flatten()(sequence))])
        model.compile(optimizer="rmsprop", loss="mse")
        return model

    _parity(build, x, y, epochs=3, batch_size=16)
    with pytest.raises(ValueError, match="single output tensor"):
        keras.Sequential([keras.Input((5, 3)), getattr(layers, cell)(4, return_state=True)])


def test_functional_summary_is_keras_verbatim(monkeypatch):
    real = _real_keras()
    monkeypatch.setenv("COLUMNS", "80")  # Keras sizes the table to the terminal
    texts = []
    for k in (real, keras):
        inputs = k.Input((5, 3), name="steps")
        sequence, h, c = k.layers.LSTM(4, return_state=True, name="lstm")(inputs)
        total = k.layers.Add(name="add")([sequence, h, c])
        model = k.Model(inputs, [total, k.layers.Dense(2, name="a_rather_long_layer_name")(h)], name="states")
        lines = []
        model.summary(print_fn=lines.append)
        texts.append("\n".join(lines))
    assert texts[1] == texts[0].rstrip("\n")
    assert "Connected to" in texts[1] and "lstm[0][1]," in texts[1]


def test_functional_shared_layer(parity_rng, tmp_path, monkeypatch):
    """One layer called on two inputs (a siamese pair): one set of weights, trained by
    both calls; summary, .keras files both ways."""
    pytest.importorskip("h5py")
    real = _real_keras()
    monkeypatch.setenv("COLUMNS", "80")

    def build(k):
        left, right = k.Input((5,), name="left"), k.Input((5,), name="right")
        encoder = k.layers.Dense(4, activation="tanh", name="encoder")
        pair = k.layers.Concatenate(name="pair")([encoder(left), encoder(right)])
        model = k.Model(
            [left, right], k.layers.Dense(1, activation="sigmoid", name="same")(pair), name="siamese"
        )
        model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
        return model

    x = [parity_rng.standard_normal((64, 5)).astype(np.float32) for _ in range(2)]
    y = (x[0].sum(axis=1) > x[1].sum(axis=1)).astype(np.float32)
    _parity(build, x, y, epochs=3)
    texts = []
    for k in (real, keras):
        lines = []
        build(k).summary(print_fn=lines.append)
        texts.append("\n".join(lines))
    assert texts[1] == texts[0].rstrip("\n") and "encoder[1][0]" in texts[1]
    ours = build(keras)
    ours.save(tmp_path / "siamese.keras")
    np.testing.assert_allclose(
        real.models.load_model(tmp_path / "siamese.keras").predict(x, verbose=0), ours.predict(x), atol=1e-6
    )


def test_functional_keras_files_load_both_ways(tmp_path, rng):
    pytest.importorskip("h5py")
    real = _real_keras()
    x, y = _two_in_two_out_data(rng, 32)
    args = {
        "loss": ["mse", "sparse_categorical_crossentropy"],
        "loss_weights": [1.0, 0.5],
        "metrics": [["mae"], ["accuracy"]],
    }
    theirs = _two_in_two_out(real, **args)
    theirs.fit(x, y, epochs=2, verbose=0)
    theirs.save(tmp_path / "real.keras")
    loaded = keras.models.load_model(tmp_path / "real.keras")
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in theirs.layers]
    for a, b in zip(loaded.predict(x), theirs.predict(x, verbose=0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    ours = _two_in_two_out(keras, **args)
    ours.fit(x, y, epochs=2, verbose=0)
    ours.save(tmp_path / "kiln.keras")
    back = real.models.load_model(tmp_path / "kiln.keras")
    for a, b in zip(back.predict(x, verbose=0), ours.predict(x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    again = keras.models.load_model(tmp_path / "kiln.keras")
    a = back.fit(x, y, epochs=1, verbose=0, shuffle=False).history
    b = again.fit(x, y, epochs=1, verbose=0, shuffle=False).history
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)


C_TRAINER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "mlp.h"
int main(int argc, char **argv) {            /* x.bin y.bin steps params.bin */
    FILE *fx = fopen(argv[1], "rb"), *fy = fopen(argv[2], "rb"), *out = fopen(argv[4], "wb");
    static float x[32 * 6];
    static int64_t y[32];
    mlp_trainer *t;
    if (mlp_trainer_create(&t) != 0) return 1;
    for (int s = 0; s < atoi(argv[3]); s++) {
        float loss;
        if (fread(x, sizeof x, 1, fx) != 1 || fread(y, sizeof y, 1, fy) != 1) return 2;
        if (mlp_train_step(t, x, y, &loss) != 0) { puts(mlp_trainer_last_error(t)); return 3; }
        printf("%.9g\n", loss);
    }
    for (int i = 0; i < mlp_num_params(); i++) {
        long n = mlp_param_size(i);
        float *p = malloc(sizeof(float) * (size_t)n);
        mlp_get_param(t, i, p);
        fwrite(p, sizeof(float), (size_t)n, out);
        free(p);
    }
    fclose(out);
    mlp_trainer_destroy(t);
    return 0;
}
"""


def _splitmix64_fractions(state: list[int], n: int) -> np.ndarray:
    """The C trainer's dropout stream: splitmix64, top 24 bits as a fraction of 2^24."""
    z = np.uint64(state[0]) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    state[0] = int(z[-1])
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(40)).astype(np.float64) / 16777216.0


def _c_trainer(model, work, x, y, steps: int, cpu: str | None = None) -> list[str]:
    """Export the model's training as mlp.so, build C_TRAINER against it: the command line."""
    import subprocess

    model.export_train(work / "mlp.so", batch_size=32, cpu=cpu)
    x.tofile(work / "x.bin")
    y.tofile(work / "y.bin")
    (work / "main.c").write_text(C_TRAINER)
    subprocess.run(
        ["gcc", "-Wall", "-Werror", str(work / "main.c"), str(work / "mlp.so"), f"-I{work}",
         f"-Wl,-rpath,{work}", "-o", str(work / "main")],
        check=True,
    )  # fmt: skip
    return [str(work / "main"), str(work / "x.bin"), str(work / "y.bin"), str(steps), str(work / "p.bin")]


def test_c_trainer_stays_inside_its_buffers(tmp_path, rng):
    """valgrind memcheck over four C training steps with Dropout (an AVX2 build: valgrind
    cannot decode AVX-512), at two threads."""
    import shutil
    import subprocess

    if shutil.which("valgrind") is None and not os.environ.get("CI"):
        pytest.skip("valgrind is not installed (.ci/run installs it; under CI its absence fails)")
    x = rng.standard_normal((128, 6)).astype(np.float32)
    y = rng.integers(0, 3, 128).astype(np.int64)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(8, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    args = _c_trainer(model, tmp_path, x, y, steps=4, cpu="x86-64-v3")
    run = subprocess.run(
        ["valgrind", "--error-exitcode=9", "--leak-check=full", "--errors-for-leak-kinds=definite", "-q",
         *args],
        capture_output=True, text=True, env={**os.environ, "KILN_NUM_THREADS": "2"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def test_export_train_gives_a_c_library_that_trains(tmp_path, rng, monkeypatch):
    """A C program trains with the exported library (Dropout masks drawn in C); its
    weights after four steps are the ones fit reaches in Python on the same batches
    with the same masks."""
    import subprocess

    x = rng.standard_normal((128, 6)).astype(np.float32)
    y = x[:, :3].argmax(axis=1).astype(np.int64)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(8, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    args = _c_trainer(model, tmp_path, x, y, steps=4)
    assert "mlp_train_step" in (tmp_path / "mlp.h").read_text()
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    stream = [0]
    monkeypatch.setattr(
        layers.Dropout,
        "draw_mask",
        lambda self, _, shape: (
            (_splitmix64_fractions(stream, int(np.prod(shape))).reshape(shape) >= self.rate)
            / np.float32(1 - self.rate)
        ),
    )
    history = model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0).history
    trained = np.concatenate([w.ravel() for w in model.get_weights()])
    np.testing.assert_allclose(np.fromfile(tmp_path / "p.bin", np.float32), trained, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.mean([float(v) for v in run.stdout.split()]), history["loss"][0], rtol=1e-6)


def test_predict_compiles_one_library_for_every_batch_size(rng):
    """Full batches and the last partial one run the same library (one compile)."""
    from runtime.batched import BatchedModel

    model = Sequential([keras.Input((12,)), Dense(16, activation="relu"), layers.Dropout(0.3), Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    x = rng.standard_normal((70, 12)).astype(np.float32)
    got = model.predict(x, batch_size=32, verbose=0)
    (w1, b1), (w2, b2) = model.layers[0].get_weights(), model.layers[2].get_weights()
    np.testing.assert_allclose(got, np.maximum(x @ w1 + b1, 0) @ w2 + b2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(x[:5], verbose=0), got[:5], rtol=1e-6, atol=1e-6)
    predict = [key for key in model._programs if key[0] == "predict"]
    assert predict == [("predict", None, "cpu")]
    assert isinstance(model._programs[predict[0]].compiled, BatchedModel)
