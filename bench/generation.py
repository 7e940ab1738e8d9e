"""Characters per second for a 500-character generation through the model server.

In-graph generation (one Predict call for the whole continuation) against the usual way with a
stateless server: a loop that calls a one-character step per request, passing the state back
each time (here the same SavedModel's `continue` signature with max_chars=1). Both go through
the same gRPC path to the embedded model server, measured in the same run.

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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

    from serving.config import Settings
    from serving.model_client import ModelClient
    from serving.model_server import start_model_server

    # The embedded model server with the gateway's thread settings, dynamic batching off.
    server = start_model_server(ROOT / "serving" / "models.config", {"/models": str(args.model_base)},
                                grpc_port=0, host="127.0.0.1",
                                intra_op_threads=Settings().intra_op_threads)
    server.manager.wait_until_available(["bard"], timeout=120)
    client = ModelClient(f"127.0.0.1:{server.grpc_port}", timeout=300)
    params = {"temperature": np.array([0.8], np.float32), "top_k": np.array([0], np.int32),
              "seed": np.array([1], np.int64)}
    prompt = np.array([b"ROMEO:"])

    def in_graph() -> tuple[float, str]:
        started = time.perf_counter()
        out, _ = client.predict("bard", {"prompt": prompt, "max_chars": np.array([args.chars], np.int32),
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

    in_graph()
    step_loop()  # warm both paths
    graph_runs = [in_graph() for _ in range(args.repeats)]
    loop_runs = [step_loop() for _ in range(args.repeats)]
    assert graph_runs[0][1] == loop_runs[0][1], "both ways must write the same text for the same seed"
    graph_s = statistics.median(t for t, _ in graph_runs)
    loop_s = statistics.median(t for t, _ in loop_runs)
    results = {
        "benchmark": "generation", "chars": args.chars, "repeats": args.repeats,
        "in_graph_seconds": round(graph_s, 4), "step_loop_seconds": round(loop_s, 4),
        "in_graph_chars_per_second": round(args.chars / graph_s, 1),
        "step_loop_chars_per_second": round(args.chars / loop_s, 1),
        "speedup": round(loop_s / graph_s, 1),
        "model": str(sorted((args.model_base / "bard").glob("[0-9]*"))[-1]),
    }
    client.close()
    server.stop()
    print(f"{args.chars} characters, median of {args.repeats}:")
    print(f"  in-graph generation, 1 call:    {results['in_graph_chars_per_second']:>9.1f} chars/s")
    print(f"  one-character step per call:    {results['step_loop_chars_per_second']:>9.1f} chars/s"
          f" ({args.chars} calls)")
    print(f"  in-graph / step loop:           {results['speedup']:>9.1f}x (target >= 30x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
