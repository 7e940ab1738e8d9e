"""The floor: the same server stack as the gateway (serving/gateway/server.py: gunicorn's threaded
workers with the gateway's worker class, settings and access log; Flask) decoding and
preprocessing the same image, answering without calling any model. How close the gateway gets to
what HTTP plus image decoding alone allow on this machine.

    SCRIBE_WORKERS=2 PORT=8090 python -m bench.floor_app
"""

from __future__ import annotations

from flask import Flask, jsonify, request

from serving.gateway.config import Settings
from serving.gateway.preprocess import decode_image, preprocess_drawing


def create_app(settings: Settings) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    @app.post("/v1/digits/predict")
    def predict():
        x = preprocess_drawing(decode_image(request.get_data(), settings.max_image_pixels))
        return jsonify(predictions=[{"digit": 0, "confidence": float(x.max())}])

    return app


if __name__ == "__main__":
    from serving.gateway.server import GatewayServer, WorkerHooks

    class Floor(WorkerHooks):
        def load(self, settings: Settings) -> Flask:
            return create_app(settings)

    GatewayServer(Settings.from_env(), Floor()).run()
