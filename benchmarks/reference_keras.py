"""The reference study's two Keras models, rebuilt from its description, for benchmarks only.

    pip install -e ".[bench]"      # tensorflow-cpu + tf-keras

The 2020 scripts used `tf.keras` (TF 2.x): the Transformer is the TF2 tutorial's encoder
(4 post-norm layers, d 128, 8 heads, FF 256, dropout 0.3, LayerNorm eps 1e-6, x * sqrt(d)
+ sinusoidal positions, no embedding), the RNN two Bidirectional(GRU(128)) layers; both
end in Dropout(0.2), a mean over time, Dense(652, SELU) and Dense(163, sigmoid); 720,467
and 768,595 parameters. Trained with Adam(1e-5) on K.sum(-(4 y log p + (1 - y) log(1 - p)), -1).

`port_weights` copies a genreclf model's weights into the Keras model (the benchmarks check
the outputs agree within 1e-5, so the two timings are of the same function).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no oneDNN/CPU-feature banners
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras = Keras 2 (tf-keras), as in 2020

import numpy as np  # noqa: E402

try:
    import tensorflow as tf  # noqa: E402
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit('the Keras reference needs TensorFlow: pip install -e ".[bench]"') from e

keras = tf.keras
N_MELS, N_GENRES = 128, 163


def positional_encoding(frames: int, dim: int) -> np.ndarray:
    """The TF tutorial's sinusoidal encoding (sin on even indices, cos on odd), float32 (frames, dim)."""
    pos = np.arange(frames)[:, None]
    i = np.arange(dim)[None, :]
    angles = pos / np.power(10000, (2 * (i // 2)) / np.float32(dim))
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return angles.astype(np.float32)


class MultiHeadAttention(keras.layers.Layer):
    """The tutorial's attention: Dense q, k, v; split heads; softmax(q k^T / sqrt(depth)) v; Dense."""

    def __init__(self, d_model: int, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.d_model, self.depth = num_heads, d_model, d_model // num_heads
        self.wq, self.wk, self.wv = (keras.layers.Dense(d_model) for _ in range(3))
        self.dense = keras.layers.Dense(d_model)

    def split_heads(self, x, batch_size):
        x = tf.reshape(x, (batch_size, -1, self.num_heads, self.depth))
        return tf.transpose(x, perm=[0, 2, 1, 3])

    def call(self, x):
        b = tf.shape(x)[0]
        q, k, v = (self.split_heads(w(x), b) for w in (self.wq, self.wk, self.wv))
        logits = tf.matmul(q, k, transpose_b=True) / tf.math.sqrt(tf.cast(self.depth, tf.float32))
        out = tf.matmul(tf.nn.softmax(logits, axis=-1), v)
        out = tf.reshape(tf.transpose(out, perm=[0, 2, 1, 3]), (b, -1, self.d_model))
        return self.dense(out)


class EncoderLayer(keras.layers.Layer):
    def __init__(self, d_model: int, num_heads: int, dff: int, rate: float, **kwargs):
        super().__init__(**kwargs)
        self.mha = MultiHeadAttention(d_model, num_heads)
        self.ffn = keras.Sequential([keras.layers.Dense(dff, activation="relu"), keras.layers.Dense(d_model)])
        self.layernorm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.dropout1, self.dropout2 = keras.layers.Dropout(rate), keras.layers.Dropout(rate)

    def call(self, x, training=None):
        out1 = self.layernorm1(x + self.dropout1(self.mha(x), training=training))
        return self.layernorm2(out1 + self.dropout2(self.ffn(out1), training=training))


class Encoder(keras.layers.Layer):
    def __init__(self, num_layers=4, d_model=128, num_heads=8, dff=256, rate=0.3, max_frames=4096, **kwargs):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.pos_encoding = tf.constant(positional_encoding(max_frames, d_model))
        self.enc_layers = [EncoderLayer(d_model, num_heads, dff, rate) for _ in range(num_layers)]
        self.dropout = keras.layers.Dropout(rate)

    def call(self, x, training=None):
        t = tf.shape(x)[1]
        x = x * tf.math.sqrt(tf.cast(self.d_model, tf.float32)) + self.pos_encoding[:t]
        x = self.dropout(x, training=training)
        for layer in self.enc_layers:
            x = layer(x, training=training)
        return x


def _head(x):
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(4 * N_GENRES, activation="selu")(x)
    return keras.layers.Dense(N_GENRES, activation="sigmoid")(x)


def transformer_classifier() -> keras.Model:
    """The reference's Transformer tagger (720,467 parameters)."""
    inp = keras.layers.Input(shape=(None, N_MELS))
    return keras.Model(inp, _head(Encoder()(inp)))


def rnn_classifier() -> keras.Model:
    """The reference's bidirectional GRU tagger (768,595 parameters)."""
    inp = keras.layers.Input(shape=(None, N_MELS))
    x = keras.layers.Bidirectional(keras.layers.GRU(128, return_sequences=True))(inp)
    x = keras.layers.Bidirectional(keras.layers.GRU(128, return_sequences=True))(x)
    return keras.Model(inp, _head(x))


def custom_binary_crossentropy(y_true, y_pred):
    """The reference's loss: positives weighted 4, summed over genres."""
    eps = keras.backend.epsilon()
    y_pred = tf.clip_by_value(y_pred, eps, 1 - eps)
    return keras.backend.sum(-(4 * y_true * tf.math.log(y_pred) + (1 - y_true) * tf.math.log(1 - y_pred)), axis=-1)


def build(kind: str, compile_model: bool = True) -> keras.Model:
    """Return the reference model for `kind` ("gru" or "transformer"), compiled as the reference's."""
    model = rnn_classifier() if kind == "gru" else transformer_classifier()
    if compile_model:
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss=custom_binary_crossentropy)
    return model


def set_threads(n: int) -> None:
    """Pin TensorFlow's thread pools (call before any op runs)."""
    tf.config.threading.set_intra_op_parallelism_threads(n)
    tf.config.threading.set_inter_op_parallelism_threads(n)


# ---------------------------------------------------------------------------
# Weights: genreclf (PyTorch) -> Keras, so both compute the same function
# ---------------------------------------------------------------------------


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _gru_gates(w: np.ndarray) -> np.ndarray:
    """PyTorch stacks GRU gates (r, z, n) on axis 0; Keras (z, r, h) on its last axis."""
    r, z, n = np.split(w, 3, axis=0)
    return np.concatenate([z, r, n], axis=0)


def port_weights(torch_model, keras_model: keras.Model, kind: str) -> None:
    """Copy a genreclf GRUTagger / TransformerTagger's weights into the matching Keras model."""
    sd = {k: _np(v) for k, v in torch_model.state_dict().items()}
    dense = lambda name: [sd[f"{name}.weight"].T, sd[f"{name}.bias"]]  # noqa: E731
    head = [layer for layer in keras_model.layers if isinstance(layer, keras.layers.Dense)]
    head[0].set_weights(dense("head.fc"))
    head[1].set_weights(dense("head.out"))
    if kind == "gru":
        bidis = [layer for layer in keras_model.layers if isinstance(layer, keras.layers.Bidirectional)]
        for i, bidi in enumerate(bidis):
            for direction, suffix in ((bidi.forward_layer, ""), (bidi.backward_layer, "_reverse")):
                k = _gru_gates(sd[f"gru.weight_ih_l{i}{suffix}"]).T
                rk = _gru_gates(sd[f"gru.weight_hh_l{i}{suffix}"]).T
                biases = (sd[f"gru.bias_ih_l{i}{suffix}"], sd[f"gru.bias_hh_l{i}{suffix}"])
                bias = np.stack([_gru_gates(b) for b in biases])  # Keras reset_after: (input, recurrent)
                direction.set_weights([k, rk, bias])
        return
    encoder = next(layer for layer in keras_model.layers if isinstance(layer, Encoder))
    for i, layer in enumerate(encoder.enc_layers):
        p = f"encoder.layers.{i}"
        wq, wk, wv = np.split(sd[f"{p}.attn.qkv.weight"], 3, axis=0)
        bq, bk, bv = np.split(sd[f"{p}.attn.qkv.bias"], 3)
        for dense_layer, w, b in ((layer.mha.wq, wq, bq), (layer.mha.wk, wk, bk), (layer.mha.wv, wv, bv)):
            dense_layer.set_weights([w.T, b])
        layer.mha.dense.set_weights(dense(f"{p}.attn.proj"))
        layer.ffn.layers[0].set_weights(dense(f"{p}.ffn.fc"))
        layer.ffn.layers[1].set_weights(dense(f"{p}.ffn.proj"))
        layer.layernorm1.set_weights([sd[f"{p}.ln1.weight"], sd[f"{p}.ln1.bias"]])
        layer.layernorm2.set_weights([sd[f"{p}.ln2.weight"], sd[f"{p}.ln2.bias"]])
