"""Past one machine: a Ray Serve deployment whose replicas each hold a batched_fn model.

Ray Serve spreads requests over replicas (on one or many machines); inside a
replica, batched_fn batches the requests that replica holds at once.  The
replica answers exactly like the single-process server (same ``/embed`` body,
same 503/504/422/413 mapping).  Needs ``pip install "ray[serve]"`` (not a
dependency of batched_fn)::

    python -m batched_fn.examples.ray_serve --replicas 2 --model toy   # serves on :8000/embed

or from Python::

    from ray import serve
    from batched_fn.examples.ray_serve import build_app
    serve.run(build_app(replicas=2, model="minilm", max_batch_size=32), route_prefix="/")

Ray Serve admits at most ``max_ongoing_requests`` requests into a replica at a
time (Ray's default is 5); a batch can never be larger than that, so
``build_app`` sets it to a few batches' worth.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Sequence

from .server import ServerConfig, build_batcher, embed_response

__all__ = ["EmbedReplica", "build_app", "main"]


class EmbedReplica:
    """One replica: a batched_fn over its own model, started (model loaded) in ``__init__``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServerConfig(**config)
        self.fn = build_batcher(self.config)
        self.fn.start()

    async def __call__(self, request: Any) -> Any:
        """Ray Serve hands the HTTP request (Starlette) here; POST bodies as for /embed."""
        return await embed_response(self.fn, self.config, request)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy (it is replaced)."""
        if not self.fn.healthy:
            raise RuntimeError("batched_fn worker is not healthy")

    def stats(self) -> dict[str, Any]:
        """This replica's batcher stats, for a DeploymentHandle caller."""
        data = dataclasses.asdict(self.fn.stats())
        data["batches_by_reason"] = dict(data["batches_by_reason"])
        return data

    def __del__(self) -> None:
        fn = getattr(self, "fn", None)
        if fn is not None:
            fn.close()


def ray_cpus() -> float | None:
    """CPUs the Ray cluster that serve.run will use has, or None when it is elsewhere (RAY_ADDRESS)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 0.0))
    if os.environ.get("RAY_ADDRESS"):
        return None
    return float(os.cpu_count() or 1)   # serve.run starts Ray on this machine, with its CPUs


def build_app(replicas: int = 2, *, num_cpus: float = 1.0, max_ongoing_requests: int | None = None,
              **knobs: Any) -> Any:
    """The bound Ray Serve application: replicas copies of EmbedReplica.

    knobs are :class:`ServerConfig` fields (``model``, ``max_batch_size``,
    ``max_delay``, ``channel_cap``...).  Imports ray only here.

    Raises:
        ValueError: replicas x num_cpus is more CPUs than the Ray cluster has
            (Ray would wait for them forever, without a word).
    """
    from ray import serve

    have = ray_cpus()
    if have is not None and replicas * num_cpus > have:
        raise ValueError(f"invalid replicas value: {replicas} replicas x num_cpus={num_cpus:g} need "
                         f"{replicas * num_cpus:g} CPUs and Ray has {have:g}; ask for fewer replicas or a "
                         f"smaller num_cpus (Ray would wait for the CPUs forever, without a word)")

    config = dataclasses.asdict(dataclasses.replace(ServerConfig(), **knobs))
    if max_ongoing_requests is None:
        max_ongoing_requests = 4 * config["max_batch_size"]
    deployment = serve.deployment(
        EmbedReplica, name="batched_fn_embed", num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=max_ongoing_requests)
    return deployment.bind(config)


def main(argv: Sequence[str] | None = None) -> None:
    """Start Ray locally, serve build_app on --port until Ctrl-C."""
    import ray
    from ray import serve

    parser = argparse.ArgumentParser(prog="python -m batched_fn.examples.ray_serve")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay", type=float, default=0.005)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(args.replicas, num_cpus=args.num_cpus, model=args.model,
                        max_batch_size=args.max_batch_size, max_delay=args.max_delay), route_prefix="/embed")
    print(f"ray serve: {args.replicas} replicas on http://127.0.0.1:{args.port}/embed (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
