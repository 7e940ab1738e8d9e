"""In-graph generation for the bard model: the loop that writes text one character at a time,
inside the SavedModel, so that one model server call returns a whole continuation.

`Generator(model, alphabet)` reads a trained Keras model's weights and offers three
tf.functions, exported as the model's signatures: `generate` (prompts in, text and the final
state out), `continue_` (a state in, more text out) and `score` (nats per character of texts).
The alphabet becomes constants in the graph.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from training.bard import FALLBACK, MAX_CODEPOINT

MAX_CHARS_PER_CALL = 10_000
UNROLL = 8  # characters per iteration of the loop in which every row writes (see `write`)


class Generator(tf.Module):
    """Generation and scoring for one trained model, as tf.functions with fixed signatures."""

    def __init__(self, model, alphabet: list[str]):
        super().__init__(name="generator")
        self.model = model
        self.embedding = model.get_layer("embedding")
        self.cells = [layer.cell for layer in model.layers if layer.name.startswith("gru_")]
        self.dense = model.get_layer("logits")
        self.units, self.vocab = self.cells[0].units, len(alphabet)
        table = np.full(MAX_CODEPOINT + 1, alphabet.index(FALLBACK), dtype=np.int32)
        for i, c in enumerate(alphabet):
            table[ord(c)] = i
        self.table = tf.constant(table)
        self.codepoints = tf.constant([ord(c) for c in alphabet], dtype=tf.int32)
        self.column_hash = mix(tf.range(self.vocab, dtype=tf.int64)[None, :] * 0x9E3779B1 % (1 << 32))
        # The first layer's input projection for each character (embedding times that layer's
        # input kernel, plus its input bias), so that in generation it is a lookup. A variable
        # saved with the export: computing it at every call would cost a one-character call more
        # than the character.
        self.char_inputs = keras.Variable(
            tf.matmul(self.embedding.embeddings, self.cells[0].kernel) + self.cells[0].bias[0],
            trainable=False, name="char_inputs")
        self.state_size = self.units * len(self.cells)
        # One value per prompt (shape [batch]), so TF Serving's batching can merge requests.
        per_prompt = [tf.TensorSpec([None], tf.int32, name="max_chars"),
                      tf.TensorSpec([None], tf.float32, name="temperature"),
                      tf.TensorSpec([None], tf.int32, name="top_k"),
                      tf.TensorSpec([None], tf.int64, name="seed")]
        self.generate = tf.function(self._generate, input_signature=[
            tf.TensorSpec([None], tf.string, name="prompt"), *per_prompt])
        self.continue_ = tf.function(self._continue, input_signature=[
            tf.TensorSpec([None, self.state_size], tf.float32, name="state"), *per_prompt,
            tf.TensorSpec([None], tf.int32, name="position")])
        self.score = tf.function(self._score, input_signature=[
            tf.TensorSpec([None], tf.string, name="text")])
        self.check_step()

    @property
    def saved_variables(self) -> list:
        """The variables generation adds to the model's, to be saved with the export."""
        return [self.char_inputs]

    # The signatures.

    def _generate(self, prompt, max_chars, temperature, top_k, seed):
        return self.write(self.read(prompt), max_chars, temperature, top_k, seed,
                          tf.zeros_like(max_chars))

    def _continue(self, state, max_chars, temperature, top_k, seed, position):
        return self.write(tf.split(state, len(self.cells), axis=1), max_chars, temperature, top_k,
                          seed, position)

    def _score(self, text):
        """Mean nats per character of each text (each character predicted from those before)."""
        padded, lengths = self.to_ids(text)
        logits = self.model(padded[:, :-1], training=False)
        targets = padded[:, 1:]
        nats = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        mask = tf.sequence_mask(lengths - 1, tf.shape(targets)[1], dtype=nats.dtype)
        counted = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        return {"nats_per_char": tf.reduce_sum(nats * mask, axis=1) / counted}

    # Reading and writing text.

    def to_ids(self, texts):
        """UTF-8 strings -> padded character ids and lengths; unknown characters -> FALLBACK."""
        chars = tf.strings.unicode_decode(texts, "UTF-8", errors="replace")
        ids = tf.ragged.map_flat_values(
            lambda cp: tf.gather(self.table, tf.clip_by_value(cp, 0, MAX_CODEPOINT)), chars)
        return ids.to_tensor(), tf.cast(ids.row_lengths(), tf.int32)

    def read(self, prompt):
        """Each layer's state after reading each prompt (rows stop where their prompt does)."""
        padded, lengths = self.to_ids(prompt)
        hs = [tf.zeros([tf.shape(prompt)[0], self.units]) for _ in self.cells]

        def body(t, hs):
            return t + 1, hold(t < lengths, self.step(padded[:, t], hs, self.read_weights()), hs)

        _, hs = tf.while_loop(lambda t, _: t < tf.shape(padded)[1], body, [0, hs])
        return hs

    def write(self, hs, max_chars, temperature, top_k, seed, position):
        """Up to max_chars[i] characters for row i; each row's state stops where its text does."""
        max_chars = tf.clip_by_value(max_chars, 0, MAX_CHARS_PER_CALL)
        steps = tf.reduce_max(tf.concat([max_chars, [0]], axis=0))
        noise = self.gumbel_noise(seed, position, steps) * tf.maximum(temperature, 1e-3)[None, :, None]
        k_max = tf.clip_by_value(tf.reduce_max(tf.concat([top_k, [0]], axis=0)), 1, self.vocab)
        # Two loops, so that requests without top_k pay nothing for it at every character.
        final, ids = tf.cond(
            tf.reduce_any(top_k > 0),
            lambda: self.write_loop(hs, max_chars, steps, noise, top_k, k_max),
            lambda: self.write_loop(hs, max_chars, steps, noise, top_k, None))
        ragged = tf.RaggedTensor.from_tensor(tf.gather(self.codepoints, ids), lengths=max_chars)
        return {"text": tf.strings.unicode_encode(ragged, "UTF-8"), "state": final}

    def write_loop(self, hs, max_chars, steps, noise, top_k, k_max):
        """The final state and the character ids [batch, steps] of `write`; top-k sampling when
        `k_max` is not None.

        While every row is still writing, no state needs holding back, and the loop's own cost
        (its control flow, weight reads, noise lookup and writing out the characters) is paid
        once per UNROLL characters. The rest, and the characters only the longer rows write, go
        one at a time."""
        every_row = tf.reduce_min(tf.concat([max_chars, [steps]], axis=0))  # chars all rows write

        def together(i, hs, written):  # UNROLL characters that every row writes
            weights, written_here = self.read_weights(), []
            positions = i + tf.range(UNROLL)
            for noise_here in tf.unstack(tf.gather(noise, positions), num=UNROLL):
                written_here.append(self.sample(hs[-1], weights, top_k, k_max, noise_here))
                hs = self.step(written_here[-1], hs, weights)
            return i + UNROLL, hs, written.scatter(positions, tf.stack(written_here))

        def one_by_one(i, hs, written):
            weights = self.read_weights()
            c = self.sample(hs[-1], weights, top_k, k_max, tf.gather(noise, i))
            return i + 1, hold(i < max_chars, self.step(c, hs, weights), hs), written.write(i, c)

        written = tf.TensorArray(tf.int32, size=steps + 1, element_shape=[None])
        i, final, written = tf.while_loop(lambda i, *_: i + UNROLL <= every_row, together,
                                          [0, hs, written])
        _, final, written = tf.while_loop(lambda i, *_: i < steps, one_by_one, [i, final, written])
        # One element more than the characters, dropped after stacking: a batch in which no row
        # writes anything (max_chars 0) would stack an empty list, which TensorFlow refuses for
        # an element shape it does not know in full.
        written = written.write(steps, tf.zeros_like(max_chars))
        # The ids are transposed as floats (exact below 2**24): oneDNN's rewrite of an integer
        # transpose logs an error-level line ("supports DT_INT32 only on platforms with AVX-512").
        by_row = tf.cast(tf.transpose(tf.cast(written.stack(), tf.float32)), tf.int32)
        return tf.concat(final, axis=1), tf.reshape(by_row[:, :steps], [tf.shape(max_chars)[0], steps])

    # One character.

    def read_weights(self):
        """What a character step reads, read inside the loop body that uses it: a variable's
        handle enters a loop once and reading it is one op, where a tensor computed outside the
        loop is a loop variable, three control-flow ops at every iteration. One unstack splits a
        bias into its two rows."""
        layers = []
        for i, cell in enumerate(self.cells):
            input_bias, recurrent_bias = tf.unstack(cell.bias)
            layers.append((tf.convert_to_tensor(self.char_inputs if i == 0 else cell.kernel),
                           input_bias, tf.convert_to_tensor(cell.recurrent_kernel), recurrent_bias))
        return layers, tf.convert_to_tensor(self.dense.kernel), tf.convert_to_tensor(self.dense.bias)

    def step(self, ids, hs, weights):
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

    def keras_step(self, ids, state):
        """Feed one character per row through Keras's own cells (the reference for `step`)."""
        x = self.embedding(ids)
        new = []
        for cell, h in zip(self.cells, tf.split(state, len(self.cells), axis=1), strict=True):
            x, _ = cell(x, h, training=False)
            new.append(x)
        return tf.concat(new, axis=1)

    def check_step(self) -> None:
        """The fused step must compute exactly what Keras's cells compute."""
        ids = tf.constant(np.arange(4) % self.vocab, tf.int32)
        state = tf.random.stateless_normal([4, self.state_size], seed=[1, 2])
        fused = tf.concat(self.step(ids, tf.split(state, len(self.cells), axis=1),
                                    self.read_weights()), axis=1)
        error = tf.reduce_max(tf.abs(fused - self.keras_step(ids, state)))
        if float(error) > 1e-4:
            raise AssertionError(f"the fused GRU step differs from Keras's cells by {float(error)}")

    def gumbel_noise(self, seed, position, steps):
        """Gumbel noise [steps, batch, vocab], a hash of (row's seed, position, character).

        Computed once per call, outside the character loop. The same seed and position give the
        same character however the generation is cut into calls (so streamed chunks join into
        the one-call text) and whatever other requests share the batch."""
        low = tf.bitwise.bitwise_and(seed, 0xFFFFFFFF)
        high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(seed, 32), 0xFFFFFFFF)
        keys = mix(tf.bitwise.bitwise_xor(mix(high), low))  # [batch]
        positions = tf.cast(position, tf.int64)[None, :] + tf.range(steps, dtype=tf.int64)[:, None]
        rows = mix(tf.bitwise.bitwise_xor(keys[None, :], mix(positions % (1 << 32))))
        bits = mix(tf.bitwise.bitwise_xor(rows[:, :, None], self.column_hash[None, :, :]))
        uniform = (tf.cast(tf.bitwise.bitwise_and(bits, 0xFFFFFF), tf.float32) + 0.5) / float(1 << 24)
        return -tf.math.log(-tf.math.log(uniform))

    def sample(self, h, weights, top_k, k_max, noise):
        """One character per row from softmax(logits / temperature) over its top_k characters
        (0: all; no top-k at all when k_max is None), by the Gumbel-max trick: noise is Gumbel
        noise already scaled by each row's temperature, since argmax(logits / T + g) =
        argmax(logits + T g) for T > 0 (and the top k are the same characters at any T). Every
        row has its own parameters, so TF Serving may batch requests together. h is the last
        layer's state."""
        logits = tf.nn.bias_add(tf.matmul(h, weights[1]), weights[2])
        if k_max is not None:
            best = tf.math.top_k(logits, k=k_max).values
            kth = tf.gather(best, tf.clip_by_value(top_k, 1, k_max) - 1, batch_dims=1)
            logits = tf.where((top_k[:, None] > 0) & (logits < kth[:, None]),
                              tf.constant(-1e9, logits.dtype), logits)
        return tf.argmax(logits + noise, axis=1, output_type=tf.int32)


def mix(h):
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 values in [0, 2**32)."""
    for multiplier in (0x2C1B3C6D, 0x297A2D39):  # below 2**31: products stay below 2**63
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
        h = tf.bitwise.bitwise_and(h * multiplier, 0xFFFFFFFF)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 15))


def hold(going, fed, hs):
    """The new state of the rows still going ([batch] bool), the old state of the others."""
    return [tf.where(going[:, None], new, h) for new, h in zip(fed, hs, strict=True)]
