"""A character-level GRU language model of Shakespeare, with generation inside the graph.

The talk's recipe (gpu profile): character embedding, 3 GRU layers of 512, sequences of 30,
batch 200, dropout 0.2, Adam 0.001. Generation feeds one character at a time, passing the state,
sampling from the top-k characters. Here that loop runs inside the SavedModel, so one model
server call returns a whole continuation, and a second signature continues from a given state
(training/generation.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from training import distribute, pipeline
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


def export(model, alphabet: list[str], export_dir: Path) -> None:
    import keras

    from training.generation import Generator

    generator = Generator(model, alphabet)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_variable_collection("generation_variables", generator.saved_variables)
    archive.add_endpoint("serving_default", generator.generate)
    archive.add_endpoint("continue", generator.continue_)
    archive.add_endpoint("score", generator.score)
    archive.write_out(str(export_dir), verbose=False)
    pipeline.write_warmup_requests(export_dir, NAME, [
        {"prompt": np.array([b"ROMEO:"]), **generation_inputs(1, 20, seed=1)},
        {"prompt": np.array([b"To be", b"KING"]), **generation_inputs(2, 20, seed=2)},
        {"__signature__": "continue", "state": np.zeros((1, generator.state_size), np.float32),
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
    chunks of `chunk` characters, through the session loader a model server uses: what the
    served version would assign."""
    from serving.tfserving.session import SavedModelSession

    model = SavedModelSession(export_dir)
    pieces = [text[i:i + chunk + 1] for i in range(0, len(text) - 1, chunk)]
    total = weight = 0.0
    for i in range(0, len(pieces), 64):
        batch = pieces[i:i + 64]
        nats = model.run("score", {"text": np.array([p.encode("utf-8") for p in batch], dtype=object)})[
            "nats_per_char"]
        sizes = np.array([len(p) - 1 for p in batch], dtype=np.float64)
        total += float((nats * sizes).sum())
        weight += float(sizes.sum())
    return total / weight


def fit(cfg: dict, vocab: int, train_ids: np.ndarray, val_ids: np.ndarray, run_dir: Path, placement):
    """Build the network under the placement's strategy and train it: (model, history, clock)."""
    import keras

    from training.clock import TrainingClock

    with placement.strategy.scope():
        model = build_model(vocab, cfg)
        schedule = keras.optimizers.schedules.CosineDecay(cfg["lr"], cfg["steps"], alpha=0.1)
        model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=5.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clock = TrainingClock(NAME, cfg["eval_every"])
    history = placement.fit(  # a line per interval: make run's server logs into the same terminal
        model, sequences(train_ids, cfg["seq_len"], cfg["batch"], shuffle=True),
        sequences(val_ids, cfg["seq_len"], 256, shuffle=False), cfg["eval_every"],
        cfg["steps"] // cfg["eval_every"],
        [clock, keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"))],
        cfg["batch"], keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None))
    return model, history, clock


def run(profile: str, corpus: str, model_base: Path, runs_dir: Path, steps: int | None = None,
        max_val_loss: float | None = None, devices: int | None = None) -> int:
    import keras

    placement = distribute.place(devices)
    cfg = dict(PROFILES[profile])
    if steps is not None:
        cfg["steps"], cfg["eval_every"] = pipeline.whole_intervals(NAME, steps, cfg["eval_every"])
    threshold = cfg["max_val_loss"] if max_val_loss is None else max_val_loss
    data = load_corpus(corpus)
    if len(data.validation) < cfg["seq_len"] + 1:  # Keras would then record no validation loss
        raise ValueError(f"{data.validation_source}: {len(data.validation)} characters, fewer than "
                         f"one {cfg['seq_len'] + 1}-character validation sequence")
    run_dir = placement.run_dir(runs_dir, NAME)
    keras.utils.set_random_seed(SEED)

    alphabet = alphabet_of(data.train)
    print(f"{NAME}: profile {profile}, {data.describe()}, {len(alphabet)} characters, "
          f"{placement.how}, run folder {run_dir}", flush=True)
    train_ids, val_ids = encode(data.train, alphabet), encode(data.validation, alphabet)
    model, history, clock = fit(cfg, len(alphabet), train_ids, val_ids, run_dir, placement)
    if not placement.cluster.is_chief:
        return placement.worker_done(NAME)
    with placement.chief(NAME) as outcome:
        model = placement.plain(model, lambda: build_model(len(alphabet), cfg))
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
            "distribution": placement.how,
            "validation": data.validation_source, "alphabet_size": len(alphabet),
            "train_characters": len(data.train), "validation_characters": len(data.validation),
            "train_seconds": round(clock.seconds, 1),  # training steps only, validation excluded
            "characters_per_second": round(cfg["steps"] * cfg["batch"] * cfg["seq_len"] / clock.seconds),
            "validation_loss_nats": val_loss, "validation_bits_per_char": val_loss / math.log(2),
            "sample": sample, "history": history.history,
        }
        describe = (f"validation loss {val_loss:.3f} nats/char ({val_loss / math.log(2):.3f} bits) "
                    f"on {data.validation_source}")
        outcome.code = pipeline.finish(NAME, run_dir, export_dir, model_base / NAME, metrics, judge, describe)
    return outcome.code


def sample_text(export_dir: Path, prompt: bytes = b"ROMEO:", chars: int = 300) -> str:
    from serving.tfserving.session import SavedModelSession

    out = SavedModelSession(export_dir).run("serving_default", {
        "prompt": np.array([prompt], dtype=object), **generation_inputs(1, chars, seed=1)})
    return prompt.decode() + out["text"][0].decode("utf-8")


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
