"""A character-level GRU language model of Shakespeare, with generation inside the graph.

The talk's recipe (gpu profile): character embedding, 3 GRU layers of 512, sequences of 30,
batch 200, dropout 0.2, Adam 0.001. Generation feeds one character at a time, passing the state,
sampling from the top-k characters. Here that loop runs inside the SavedModel, so one model
server call returns a whole continuation, and a second signature continues from a given state.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from training import pipeline
from training.shakespeare_data import load_corpus

NAME = "bard"
PROFILES = {
    "quick": dict(layers=1, units=64, embedding=16, seq_len=50, batch=32, steps=120,
                  eval_every=40, lr=0.005, dropout=0.0, max_val_loss=3.0),
    "cpu": dict(layers=2, units=256, embedding=32, seq_len=100, batch=64, steps=1100,
                eval_every=100, lr=0.004, dropout=0.1, max_val_loss=1.65),
    "gpu": dict(layers=3, units=512, embedding=64, seq_len=30, batch=200, steps=5000,
                eval_every=500, lr=0.001, dropout=0.2, max_val_loss=1.5),
}
MAX_REGRESSION = 0.02  # nats per character a new version may lose against the pushed one
FALLBACK = " "  # characters outside the alphabet are read as a space
MAX_CODEPOINT = 0xFFFF  # the in-graph character table covers the Basic Multilingual Plane
MAX_CHARS_PER_CALL = 10_000
UNROLL = 8  # characters per iteration of the generation loop (see `write`)
SEED = 42


def alphabet_of(text: str) -> list[str]:
    chars = sorted({c for c in text if ord(c) <= MAX_CODEPOINT} | {FALLBACK})
    return chars


def encode(text: str, alphabet: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(alphabet)}
    fallback = index[FALLBACK]
    return np.array([index.get(c, fallback) for c in text], dtype=np.int32)


def build_model(vocab: int, cfg: dict):
    import keras
    from keras import layers

    ids = keras.Input((None,), dtype="int32", name="ids")
    x = layers.Embedding(vocab, cfg["embedding"], name="embedding")(ids)
    for i in range(cfg["layers"]):
        x = layers.GRU(cfg["units"], return_sequences=True, name=f"gru_{i}")(x)
        if cfg["dropout"]:
            x = layers.Dropout(cfg["dropout"])(x)
    logits = layers.Dense(vocab, name="logits")(x)
    return keras.Model(ids, logits, name="bard_gru")


def sequences(ids: np.ndarray, seq_len: int, batch: int, shuffle: bool):
    """(input, target) pairs of seq_len characters, target shifted by one."""
    import tensorflow as tf

    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1: n * seq_len + 1].reshape(n, seq_len)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        data = data.shuffle(n, seed=SEED).repeat()
    return data.batch(batch, drop_remainder=shuffle).prefetch(tf.data.AUTOTUNE)


def make_generator(model, alphabet: list[str]):
    """tf.functions for in-graph generation, and the variables they add to the model's (to be
    saved with them). The alphabet becomes constants in the graph."""
    import keras
    import tensorflow as tf

    embedding = model.get_layer("embedding")
    cells = [layer.cell for layer in model.layers if layer.name.startswith("gru_")]
    dense = model.get_layer("logits")
    units = cells[0].units
    vocab = len(alphabet)
    table = np.full(MAX_CODEPOINT + 1, alphabet.index(FALLBACK), dtype=np.int32)
    for i, c in enumerate(alphabet):
        table[ord(c)] = i
    codepoints = tf.constant([ord(c) for c in alphabet], dtype=tf.int32)
    table = tf.constant(table)

    def keras_step(ids, state):
        """Feed one character per row through Keras's own cells (the reference for `step`)."""
        x = embedding(ids)
        new = []
        for cell, h in zip(cells, tf.split(state, len(cells), axis=1), strict=True):
            x, _ = cell(x, h, training=False)
            new.append(x)
        return tf.concat(new, axis=1)

    # The first layer's input projection for each character (embedding times that layer's input
    # kernel, plus its input bias), so that in generation it is a lookup. It is a variable saved
    # with the export: computing it costs about 0.1 ms, which a call writing one character pays.
    char_inputs = keras.Variable(
        tf.matmul(embedding.embeddings, cells[0].kernel) + cells[0].bias[0], trainable=False,
        name="char_inputs")

    def read_weights():
        """What a character step reads, read inside the loop body that uses it: a variable's
        handle enters a loop once and reading it is one op, where a tensor computed outside the
        loop is a loop variable, three control-flow ops at every iteration. One unstack splits a
        bias into its two rows."""
        layers = []
        for i, cell in enumerate(cells):
            input_bias, recurrent_bias = tf.unstack(cell.bias)
            layers.append((tf.convert_to_tensor(char_inputs if i == 0 else cell.kernel), input_bias,
                           tf.convert_to_tensor(cell.recurrent_kernel), recurrent_bias))
        return layers, tf.convert_to_tensor(dense.kernel), tf.convert_to_tensor(dense.bias)

    def step(ids, hs, weights):
        """Feed one character per row; hs holds each layer's hidden state [batch, units].

        Keras's GRU (reset_after=True, sigmoid gates, tanh candidate) in fewer ops per character
        than calling its cells: a generation is a long chain of tiny ops, and at batch 1 each op's
        fixed cost is as much as its arithmetic. Each layer's state is its own loop variable (no
        split and concat at every step), and bias_add lets Grappler fuse the add into the MatMul."""
        new = []
        for i, (h, (kernel, input_bias, recurrent, recurrent_bias)) in enumerate(
                zip(hs, weights[0], strict=True)):
            x = tf.gather(kernel, ids) if i == 0 else tf.nn.bias_add(tf.matmul(new[-1], kernel), input_bias)
            x_z, x_r, x_h = tf.split(x, 3, axis=1)
            h_z, h_r, h_h = tf.split(tf.nn.bias_add(tf.matmul(h, recurrent), recurrent_bias), 3, axis=1)
            z = tf.sigmoid(x_z + h_z)
            candidate = tf.tanh(x_h + tf.sigmoid(x_r + h_r) * h_h)
            new.append(candidate + z * (h - candidate))  # z * h + (1 - z) * candidate
        return new

    def mix(h):
        """A 32-bit integer hash (xorshift-multiply rounds) on int64 values in [0, 2**32)."""
        for multiplier in (0x2C1B3C6D, 0x297A2D39):  # below 2**31: products stay below 2**63
            h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
            h = tf.bitwise.bitwise_and(h * multiplier, 0xFFFFFFFF)
        return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 15))

    column_hash = mix(tf.range(vocab, dtype=tf.int64)[None, :] * 0x9E3779B1 % (1 << 32))

    def gumbel_noise(seed, position, steps):
        """Gumbel noise [steps, batch, vocab], a hash of (row's seed, position, character).

        Computed once per call, outside the character loop. The same seed and position give the
        same character however the generation is cut into calls (so streamed chunks join into
        the one-call text) and whatever other requests share the batch."""
        low = tf.bitwise.bitwise_and(seed, 0xFFFFFFFF)
        high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(seed, 32), 0xFFFFFFFF)
        keys = mix(tf.bitwise.bitwise_xor(mix(high), low))  # [batch]
        positions = tf.cast(position, tf.int64)[None, :] + tf.range(steps, dtype=tf.int64)[:, None]
        rows = mix(tf.bitwise.bitwise_xor(keys[None, :], mix(positions % (1 << 32))))
        bits = mix(tf.bitwise.bitwise_xor(rows[:, :, None], column_hash[None, :, :]))
        uniform = (tf.cast(tf.bitwise.bitwise_and(bits, 0xFFFFFF), tf.float32) + 0.5) / float(1 << 24)
        return -tf.math.log(-tf.math.log(uniform))

    def sample(h, weights, top_k, k_max, noise):
        """One character per row from softmax(logits / temperature) over its top_k characters
        (0: all), by the Gumbel-max trick: noise is Gumbel noise already scaled by each row's
        temperature, since argmax(logits / T + g) = argmax(logits + T g) for T > 0 (and the top
        k are the same characters at any T). Every row has its own parameters, so TF Serving may
        batch requests together. h is the last layer's state."""
        logits = tf.nn.bias_add(tf.matmul(h, weights[1]), weights[2])
        if k_max is not None:
            best = tf.math.top_k(logits, k=k_max).values
            kth = tf.gather(best, tf.clip_by_value(top_k, 1, k_max) - 1, batch_dims=1)
            logits = tf.where((top_k[:, None] > 0) & (logits < kth[:, None]),
                              tf.constant(-1e9, logits.dtype), logits)
        return tf.argmax(logits + noise, axis=1, output_type=tf.int32)

    def to_ids(texts):
        """UTF-8 strings -> padded character ids and lengths; unknown characters -> FALLBACK."""
        chars = tf.strings.unicode_decode(texts, "UTF-8", errors="replace")
        ids = tf.ragged.map_flat_values(
            lambda cp: tf.gather(table, tf.clip_by_value(cp, 0, MAX_CODEPOINT)), chars)
        return ids.to_tensor(), tf.cast(ids.row_lengths(), tf.int32)

    def hold(going, fed, hs):
        """The new state of the rows still going ([batch] bool), the old state of the others."""
        return [tf.where(going[:, None], new, h) for new, h in zip(fed, hs, strict=True)]

    def read(prompt):
        """Each layer's state after reading each prompt (rows stop where their prompt does)."""
        padded, lengths = to_ids(prompt)
        hs = [tf.zeros([tf.shape(prompt)[0], units]) for _ in cells]

        def body(t, hs):
            return t + 1, hold(t < lengths, step(padded[:, t], hs, read_weights()), hs)

        _, hs = tf.while_loop(lambda t, _: t < tf.shape(padded)[1], body, [0, hs])
        return hs

    def write(hs, max_chars, temperature, top_k, seed, position):
        """Up to max_chars[i] characters for row i; each row's state stops where its text does."""
        max_chars = tf.clip_by_value(max_chars, 0, MAX_CHARS_PER_CALL)
        steps = tf.reduce_max(tf.concat([max_chars, [0]], axis=0))
        every_row = tf.reduce_min(tf.concat([max_chars, [steps]], axis=0))  # chars all rows write
        noise = gumbel_noise(seed, position, steps) * tf.maximum(temperature, 1e-3)[None, :, None]
        k_max = tf.clip_by_value(tf.reduce_max(tf.concat([top_k, [0]], axis=0)), 1, vocab)

        def loop(use_top_k: bool):
            def together(i, hs, written):  # UNROLL characters that every row writes
                weights, written_here = read_weights(), []
                positions = i + tf.range(UNROLL)
                for noise_here in tf.unstack(tf.gather(noise, positions), num=UNROLL):
                    written_here.append(sample(hs[-1], weights, top_k, k_max if use_top_k else None,
                                               noise_here))
                    hs = step(written_here[-1], hs, weights)
                return i + UNROLL, hs, written.scatter(positions, tf.stack(written_here))

            def one_by_one(i, hs, written):
                weights = read_weights()
                c = sample(hs[-1], weights, top_k, k_max if use_top_k else None, tf.gather(noise, i))
                return i + 1, hold(i < max_chars, step(c, hs, weights), hs), written.write(i, c)

            # While every row is still writing, no state needs holding back, and the loop's own
            # cost (its control flow, weight reads, noise lookup and writing out the characters) is
            # paid once per UNROLL characters. The rest, and the characters only the longer rows
            # write, go one at a time.
            written = tf.TensorArray(tf.int32, size=steps + 1, element_shape=[None])
            i, final, written = tf.while_loop(lambda i, *_: i + UNROLL <= every_row, together,
                                              [0, hs, written])
            _, final, written = tf.while_loop(lambda i, *_: i < steps, one_by_one, [i, final, written])
            # One element more than the characters, dropped after stacking: a batch in which no
            # row writes anything (max_chars 0) would stack an empty list, which TensorFlow
            # refuses for an element shape it does not know in full.
            written = written.write(steps, tf.zeros_like(max_chars))
            return (tf.concat(final, axis=1),
                    tf.reshape(tf.transpose(written.stack())[:, :steps], [tf.shape(max_chars)[0], steps]))

        # Two loops, so that requests without top_k pay nothing for it at every character.
        final, ids = tf.cond(tf.reduce_any(top_k > 0), lambda: loop(True), lambda: loop(False))
        ragged = tf.RaggedTensor.from_tensor(tf.gather(codepoints, ids), lengths=max_chars)
        return {"text": tf.strings.unicode_encode(ragged, "UTF-8"), "state": final}

    state_size = units * len(cells)
    # One value per prompt (shape [batch]), so TF Serving's batching can merge requests.
    per_prompt = [tf.TensorSpec([None], tf.int32, name="max_chars"),
               tf.TensorSpec([None], tf.float32, name="temperature"),
               tf.TensorSpec([None], tf.int32, name="top_k"),
               tf.TensorSpec([None], tf.int64, name="seed")]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompt"), *per_prompt])
    def generate(prompt, max_chars, temperature, top_k, seed):
        return write(read(prompt), max_chars, temperature, top_k, seed, tf.zeros_like(max_chars))

    @tf.function(input_signature=[tf.TensorSpec([None, state_size], tf.float32, name="state"),
                                  *per_prompt, tf.TensorSpec([None], tf.int32, name="position")])
    def continue_(state, max_chars, temperature, top_k, seed, position):
        return write(tf.split(state, len(cells), axis=1), max_chars, temperature, top_k, seed,
                     position)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def score(text):
        """Mean nats per character of each text (each character predicted from those before)."""
        padded, lengths = to_ids(text)
        logits = model(padded[:, :-1], training=False)
        targets = padded[:, 1:]
        nats = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        mask = tf.sequence_mask(lengths - 1, tf.shape(targets)[1], dtype=nats.dtype)
        counted = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        return {"nats_per_char": tf.reduce_sum(nats * mask, axis=1) / counted}

    def check_step() -> None:
        """The fused step must compute exactly what Keras's cells compute."""
        ids = tf.constant(np.arange(4) % vocab, tf.int32)
        state = tf.random.stateless_normal([4, units * len(cells)], seed=[1, 2])
        fused = tf.concat(step(ids, tf.split(state, len(cells), axis=1), read_weights()), axis=1)
        error = tf.reduce_max(tf.abs(fused - keras_step(ids, state)))
        if float(error) > 1e-4:
            raise AssertionError(f"the fused GRU step differs from Keras's cells by {float(error)}")

    check_step()
    return generate, continue_, score, [char_inputs]


def export(model, alphabet: list[str], export_dir: Path) -> None:
    import keras

    generate, continue_, score, generation_variables = make_generator(model, alphabet)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_variable_collection("generation_variables", generation_variables)
    archive.add_endpoint("serving_default", generate)
    archive.add_endpoint("continue", continue_)
    archive.add_endpoint("score", score)
    archive.write_out(str(export_dir), verbose=False)
    pipeline.write_warmup_requests(export_dir, NAME, [
        {"prompt": np.array([b"ROMEO:"]), **generation_inputs(1, 20, seed=1)},
        {"prompt": np.array([b"To be", b"KING"]), **generation_inputs(2, 20, seed=2)},
        {"__signature__": "continue", "state": np.zeros((1, continue_.input_signature[0].shape[1]),
                                                         np.float32),
         "position": np.array([20], np.int32), **generation_inputs(1, 20, seed=1)},
    ])


def generation_inputs(rows: int, max_chars: int, temperature: float = 0.8, top_k: int = 0,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """The per-prompt parameters of the generation signatures, one value per row."""
    return {"max_chars": np.full(rows, max_chars, np.int32),
            "temperature": np.full(rows, temperature, np.float32),
            "top_k": np.full(rows, top_k, np.int32), "seed": np.full(rows, seed, np.int64)}


def evaluate_saved_model(export_dir: Path, text: str, chunk: int = 1000) -> float:
    """Nats per character that a SavedModel's `score` signature assigns to `text`, read in
    chunks of `chunk` characters: what the served version would assign."""
    import tensorflow as tf

    score = tf.saved_model.load(str(export_dir)).signatures["score"]
    pieces = [text[i:i + chunk + 1] for i in range(0, len(text) - 1, chunk)]
    total = weight = 0.0
    for i in range(0, len(pieces), 64):
        batch = pieces[i:i + 64]
        nats = score(text=tf.constant([p.encode("utf-8") for p in batch]))["nats_per_char"].numpy()
        sizes = np.array([len(p) - 1 for p in batch], dtype=np.float64)
        total += float((nats * sizes).sum())
        weight += float(sizes.sum())
    return total / weight


def run(profile: str, corpus: str, model_base: Path, runs_dir: Path, steps: int | None = None,
        max_val_loss: float | None = None) -> int:
    import keras

    from training.clock import TrainingClock

    cfg = dict(PROFILES[profile])
    if steps is not None:
        cfg["steps"], cfg["eval_every"] = pipeline.whole_intervals(NAME, steps, cfg["eval_every"])
    threshold = cfg["max_val_loss"] if max_val_loss is None else max_val_loss
    data = load_corpus(corpus)
    if len(data.validation) < cfg["seq_len"] + 1:  # Keras would then record no validation loss
        raise ValueError(f"{data.validation_source}: {len(data.validation)} characters, fewer than "
                         f"one {cfg['seq_len'] + 1}-character validation sequence")
    run_dir = pipeline.make_run_dir(runs_dir, NAME)
    keras.utils.set_random_seed(SEED)

    alphabet = alphabet_of(data.train)
    print(f"{NAME}: profile {profile}, {data.describe()}, {len(alphabet)} characters, "
          f"run folder {run_dir}", flush=True)
    train_ids, val_ids = encode(data.train, alphabet), encode(data.validation, alphabet)
    model = build_model(len(alphabet), cfg)
    schedule = keras.optimizers.schedules.CosineDecay(cfg["lr"], cfg["steps"], alpha=0.1)
    model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=5.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clock = TrainingClock()
    history = model.fit(
        sequences(train_ids, cfg["seq_len"], cfg["batch"], shuffle=True),
        steps_per_epoch=cfg["eval_every"], epochs=cfg["steps"] // cfg["eval_every"],
        validation_data=sequences(val_ids, cfg["seq_len"], 256, shuffle=False), shuffle=False,
        verbose=1 if sys.stdout.isatty() else 2,
        callbacks=[clock, keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"))])
    plot_curves(history.history, cfg["eval_every"], run_dir / "curves.png")

    export_dir = run_dir / "export"
    export(model, alphabet, export_dir)
    pipeline.verify_export(export_dir, {"prompt": np.array([b"ROMEO:"]),
                                        **generation_inputs(1, 40, seed=7)}, ["text", "state"])
    val_loss = evaluate_saved_model(export_dir, data.validation)

    def judge(baseline_dir: Path | None) -> tuple[dict, pipeline.Blessing]:
        baseline = None if baseline_dir is None else evaluate_saved_model(baseline_dir, data.validation)
        return ({"baseline_validation_loss_nats": baseline},
                pipeline.bless("validation loss (nats/char)", val_loss, baseline, threshold=threshold,
                               max_regression=MAX_REGRESSION, higher_is_better=False))

    sample = sample_text(export_dir)
    (run_dir / "sample.txt").write_text(sample)
    metrics = {
        "model": NAME, "profile": profile, "settings": cfg, "corpus": data.source,
        "validation": data.validation_source, "alphabet_size": len(alphabet),
        "train_characters": len(data.train), "validation_characters": len(data.validation),
        "train_seconds": round(clock.seconds, 1),  # training steps only, validation excluded
        "characters_per_second": round(cfg["steps"] * cfg["batch"] * cfg["seq_len"] / clock.seconds),
        "validation_loss_nats": val_loss, "validation_bits_per_char": val_loss / math.log(2),
        "sample": sample, "history": history.history,
    }
    describe = (f"validation loss {val_loss:.3f} nats/char ({val_loss / math.log(2):.3f} bits) "
                f"on {data.validation_source}")
    return pipeline.finish(NAME, run_dir, export_dir, model_base / NAME, metrics, judge, describe)


def sample_text(export_dir: Path, prompt: bytes = b"ROMEO:", chars: int = 300) -> str:
    import tensorflow as tf

    generate = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    inputs = {k: tf.constant(v) for k, v in generation_inputs(1, chars, seed=1).items()}
    out = generate(prompt=tf.constant([prompt]), **inputs)
    return prompt.decode() + out["text"].numpy()[0].decode("utf-8")


def plot_curves(history: dict, steps_per_point: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(i + 1) * steps_per_point for i in range(len(history["loss"]))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, history["loss"], label="train")
    ax.plot(steps, history["val_loss"], label="validation (held-out plays)")
    ax.set(title="cross-entropy (nats per character)", xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
