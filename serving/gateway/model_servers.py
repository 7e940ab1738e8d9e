"""Each model server behind the gateway, asked on its own: which ones answer and what they serve.

Predict calls go through one round_robin channel (model_client.py), which hides which server
answered. /readyz and /v1/models must not: with three TF Serving replicas, one of them still
loading or dead is worth showing, and the gateway is ready while at least one has the models the
endpoints call by default.
So the status asks every address the target names over its own channel, with no retries, all at
once. A target that names one server (host:port, unix:PATH) is one server, whatever gRPC does with
the addresses its name resolves to."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from serving.gateway.config import channel_target
from serving.gateway.model_client import ModelClient

DNS = "dns:///"
# A status call's deadline: a server that does not answer within it (blackholed, a dead node)
# counts as not answering, and /readyz still answers within a probe's timeout.
STATUS_TIMEOUT_SECONDS = 2.0
NO_VERSION = "no version loaded"


def server_addresses(target: str) -> list[str]:
    """The model servers SCRIBE_MODEL_SERVER names, one address each: every address a dns:///
    name resolves to now, each entry of a list, or the one target."""
    resolved = channel_target(target)
    if resolved.startswith(("ipv4:", "ipv6:")):
        return resolved.split(":", 1)[1].split(",")
    if not resolved.startswith(DNS):
        return [resolved]
    host, _, port = resolved[len(DNS):].rpartition(":")
    try:
        found = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return []  # the name does not resolve (yet): no server answered
    hosts = dict.fromkeys(info[4][0] for info in found)  # unique, in the resolver's order
    return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts]


@dataclass
class ServerReport:
    """One model server's answer: per model, its versions as ModelClient.status gives them."""

    address: str
    models: dict[str, list[dict]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # model name -> why it had no answer

    @property
    def answered(self) -> bool:
        """It answered at least one status call (a model it has no version of is an answer too)."""
        return bool(self.models) or NO_VERSION in self.errors.values()

    def available(self, model: str) -> list[int]:
        return [v["version"] for v in self.models.get(model, []) if v["state"] == "AVAILABLE"]

    def serves_all(self, names: list[str]) -> bool:
        return self.answered and all(self.available(name) for name in names)


class ModelServers:
    """A channel per model server, kept while its address is named, for status calls only."""

    def __init__(self, target: str, timeout: float):
        self.target, self.timeout = target, min(timeout, STATUS_TIMEOUT_SECONDS)
        self.clients: dict[str, ModelClient] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="model-server-status")

    def reports(self, names: list[str]) -> list[ServerReport]:
        """Every named server's answer about `names`: every (server, model) asked at once, so the
        answer takes one status call's time at most."""
        clients = self._clients(server_addresses(self.target))
        asked = {(address, name): self.pool.submit(self._status, client, name)
                 for address, client in clients.items() for name in names}
        reports = {address: ServerReport(address) for address in clients}
        for (address, name), answer in asked.items():
            versions, error = answer.result()
            if error is None:
                reports[address].models[name] = versions
            else:
                reports[address].errors[name] = error
        return list(reports.values())

    def _clients(self, addresses: list[str]) -> dict[str, ModelClient]:
        with self.lock:
            for gone in set(self.clients) - set(addresses):
                self.clients.pop(gone).close()
            for address in addresses:
                if address not in self.clients:
                    self.clients[address] = ModelClient(address, self.timeout, retries=False)
            return {address: self.clients[address] for address in addresses}

    @staticmethod
    def _status(client: ModelClient, name: str) -> tuple[list[dict], str | None]:
        """(the model's versions, None), or ([], why the server gave none)."""
        try:
            return client.status(name), None
        except grpc.RpcError as error:
            return [], (NO_VERSION if error.code() == grpc.StatusCode.NOT_FOUND
                        else f"model server: {error.code().name.lower()}")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            for client in self.clients.values():
                client.close()
            self.clients.clear()
