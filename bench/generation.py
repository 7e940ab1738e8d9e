"""Characters per second and time to the first chunk for a 500-character generation.

Measured in the same run, medians over --repeats interleaved rounds:
  - in-graph generation through the model server: one Predict call for the whole continuation;
    its first chunk is the gateway's first streamed chunk (one call of stream_chunk_chars);
  - the usual way with a stateless server: a loop that calls a one-character step per request,
    passing the state back each time (the same SavedModel's `continue` signature, max_chars=1);
    both through the same gRPC path to the embedded model server;
  - the compute floor: the same SavedModel's generation in-process, in a session loaded as the
    model server loads its own (TF Serving's loader, the same thread settings): no serving;
  - the gateway over HTTP (`python -m serving`, a `stream: true` request): what a user sees.

    python bench/generation.py [--model-base models] [--chars 500] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-base", type=Path, default=ROOT / "models")
    parser.add_argument("--chars", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generation.json")
    args = parser.parse_args()
    if not any((args.model_base / "bard").glob("[0-9]*/saved_model.pb")):
        print(f"no bard version under {args.model_base}: run `make train` first", file=sys.stderr)
        return 1

    from serving.gateway.config import Settings
    from serving.gateway.model_client import ModelClient
    from serving.model_server import start_model_server
    from serving.tfserving.session import load_session, read_signature_defs
    from serving.tfserving.versions import latest_version
    from training.bard import generation_inputs

    # The embedded model server with the gateway's thread settings, dynamic batching off.
    server = start_model_server(ROOT / "serving" / "models.config", {"/models": str(args.model_base)},
                                grpc_port=0, host="127.0.0.1",
                                intra_op_threads=Settings().intra_op_threads,
                                inter_op_threads=Settings().inter_op_threads)
    server.manager.wait_until_available(["bard"], timeout=120)
    client = ModelClient(f"127.0.0.1:{server.grpc_port}", timeout=300)
    params = {k: v for k, v in generation_inputs(1, 1, seed=1).items() if k != "max_chars"}
    prompt = np.array([b"ROMEO:"])

    def in_graph(chars: int = args.chars) -> tuple[float, str]:
        started = time.perf_counter()
        out, _ = client.predict("bard", {"prompt": prompt, "max_chars": np.array([chars], np.int32),
                                         **params})
        return time.perf_counter() - started, out["text"][0].decode()

    def step_loop() -> tuple[float, str]:
        started = time.perf_counter()
        out, _ = client.predict("bard", {"prompt": prompt, "max_chars": np.array([1], np.int32),
                                         **params})
        text = [out["text"][0].decode()]
        for position in range(1, args.chars):
            out, _ = client.predict("bard", {"state": out["state"], "max_chars": np.array([1], np.int32),
                                             "position": np.array([position], np.int32), **params},
                                    signature="continue")
            text.append(out["text"][0].decode())
        return time.perf_counter() - started, "".join(text)

    # The floor: a session loaded as the model server loads its own (the same loader, and the
    # thread settings start_model_server set in this process), called directly: no serving.
    version_dir = args.model_base / "bard" / str(latest_version(args.model_base / "bard"))
    session = load_session(version_dir)
    signature = read_signature_defs(version_dir)["serving_default"]
    feeds = {key: tensor.name for key, tensor in signature.inputs.items()}

    def compute_floor(chars: int = args.chars) -> tuple[float, str]:
        started = time.perf_counter()
        text = session.run(signature.outputs["text"].name, {
            feeds["prompt"]: prompt, feeds["max_chars"]: np.array([chars], np.int32),
            **{feeds[key]: value for key, value in params.items()}})
        return time.perf_counter() - started, text[0].decode()

    chunk = Settings().stream_chunk_chars
    for warm in (in_graph, step_loop, compute_floor):
        warm()
    # Interleaved, so that a busy spell on this shared machine hits every way alike. A one-call
    # generation takes about a tenth of a second, so it runs 5 times per round to the loop's once.
    graph_runs, loop_runs, floor_runs = [], [], []
    for _ in range(args.repeats):
        for _ in range(5):
            graph_runs.append(in_graph())
            floor_runs.append(compute_floor())
        loop_runs.append(step_loop())
    assert graph_runs[0][1] == loop_runs[0][1] == floor_runs[0][1], \
        "every way must write the same text for the same seed"
    first_chunk = {  # seconds to the first piece of text a streaming client could show
        "in_graph": statistics.median(in_graph(chunk)[0] for _ in range(args.repeats)),
        "step_loop": statistics.median(in_graph(1)[0] for _ in range(args.repeats)),  # its first step
        "compute_floor": statistics.median(compute_floor(chunk)[0] for _ in range(args.repeats)),
    }
    client.close()
    server.stop()
    session.close()
    http = gateway_stream(args.model_base, args.chars, args.repeats)

    graph_s = statistics.median(t for t, _ in graph_runs)
    loop_s = statistics.median(t for t, _ in loop_runs)
    floor_s = statistics.median(t for t, _ in floor_runs)
    results = {
        "benchmark": "generation", "chars": args.chars, "repeats": args.repeats,
        "stream_chunk_chars": chunk, "model": str(version_dir),
        "in_graph_seconds": round(graph_s, 4), "step_loop_seconds": round(loop_s, 4),
        "compute_floor_seconds": round(floor_s, 4),
        "in_graph_chars_per_second": round(args.chars / graph_s, 1),
        "step_loop_chars_per_second": round(args.chars / loop_s, 1),
        "compute_floor_chars_per_second": round(args.chars / floor_s, 1),
        "gateway_stream_chars_per_second": round(args.chars / http["seconds"], 1),
        "first_chunk_ms": {**{k: round(v * 1000, 1) for k, v in first_chunk.items()},
                           "gateway_stream": round(http["first_chunk"] * 1000, 1)},
        "speedup": round(loop_s / graph_s, 1),
        "in_graph_vs_compute_floor": round(floor_s / graph_s, 3),
    }
    print(f"{args.chars} characters, medians of {args.repeats} rounds ({version_dir}):")
    print(f"  {'':34s} {'chars/s':>9s}  first chunk")
    print(f"  {'in-graph generation, 1 call':34s} {results['in_graph_chars_per_second']:>9.1f}"
          f"  {results['first_chunk_ms']['in_graph']:7.1f} ms ({chunk} characters)")
    print(f"  {'one-character step per call':34s} {results['step_loop_chars_per_second']:>9.1f}"
          f"  {results['first_chunk_ms']['step_loop']:7.1f} ms (1 character; {args.chars} calls)")
    print(f"  {'compute floor, in-process':34s} {results['compute_floor_chars_per_second']:>9.1f}"
          f"  {results['first_chunk_ms']['compute_floor']:7.1f} ms ({chunk} characters)")
    print(f"  {'gateway, HTTP stream':34s} {results['gateway_stream_chars_per_second']:>9.1f}"
          f"  {results['first_chunk_ms']['gateway_stream']:7.1f} ms (first chunk event)")
    print(f"  in-graph / step loop:     {results['speedup']:.1f}x (target >= 30x)")
    print(f"  in-graph / compute floor: {results['in_graph_vs_compute_floor']:.0%} (target >= 50%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def gateway_stream(model_base: Path, chars: int, repeats: int) -> dict:
    """A `stream: true` request to the gateway under gunicorn: seconds to the first chunk event
    and to the end of the stream, median of `repeats`."""
    from http_digits import Server, free_port  # bench/ is on the path: run as a script

    port = free_port()
    env = {"SCRIBE_MODEL_DIR": str(model_base.resolve()), "PORT": str(port), "TF_CPP_MIN_LOG_LEVEL": "2"}
    server = Server("gateway", [sys.executable, "-m", "serving"], env, port)
    url = server.url
    try:
        if server.wait_until_ready() is None:
            raise TimeoutError("the gateway did not become ready")
        body = {"prompt": "ROMEO:", "max_chars": chars, "seed": 1, "temperature": 0.8, "stream": True}
        runs = []
        for _ in range(repeats + 1):  # the first one warms up
            started, first = time.perf_counter(), None
            with requests.post(url + "/v1/text/generate", json=body, stream=True, timeout=120) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if first is None and line == b"event: chunk":
                        first = time.perf_counter() - started
            runs.append((first, time.perf_counter() - started))
        return {"first_chunk": statistics.median(f for f, _ in runs[1:]),
                "seconds": statistics.median(t for _, t in runs[1:])}
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
