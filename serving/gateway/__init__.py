"""The gateway: Flask over HTTP, one module per API, preprocessing, and the gRPC client of a
TF Serving model server whose address it is handed (serving/gateway/app.py: create_app)."""
