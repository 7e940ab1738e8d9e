"""The usual tutorial baseline: a minimal Flask app that calls Keras `model.predict` on the same
model for every request (same decoding and preprocessing as the gateway).

    SCRIBE_BENCH_MODEL=models/digits/1 gunicorn -w 2 'bench.baseline_keras_app:create_app()'
"""

from __future__ import annotations

import os

import numpy as np
from flask import Flask, jsonify, request

from serving.gateway.preprocess import decode_image, preprocess_drawing


def create_app() -> Flask:
    import keras

    app = Flask(__name__)
    layer = keras.layers.TFSMLayer(os.environ["SCRIBE_BENCH_MODEL"], call_endpoint="serving_default")
    image = keras.Input((28, 28))
    model = keras.Model(image, layer(image)["probabilities"])

    @app.post("/v1/digits/predict")
    def predict():
        x = preprocess_drawing(decode_image(request.get_data(), 4096 * 4096))[None]
        probabilities = model.predict(x, verbose=0)[0]
        digit = int(np.argmax(probabilities))
        return jsonify(predictions=[{"digit": digit, "confidence": float(probabilities[digit])}])

    return app
