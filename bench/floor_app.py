"""The floor: the same server stack (Flask under gunicorn) decoding and preprocessing the same
image, answering without calling any model. How close the gateway gets to what HTTP plus image
decoding alone allow on this machine.

    gunicorn -w 2 -k gthread --threads 16 'bench.floor_app:create_app()'
"""

from __future__ import annotations

from flask import Flask, jsonify, request

from serving.preprocess import decode_image, preprocess_drawing


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/v1/digits/predict")
    def predict():
        x = preprocess_drawing(decode_image(request.get_data(), 4096 * 4096))
        return jsonify(predictions=[{"digit": 0, "confidence": float(x.max())}])

    return app
