"""The Ray Serve recipe, run locally: two replicas, each a batched_fn over the toy model.

ray is not a dependency of batched_fn (it is large); this test runs where
``ray[serve]`` is installed and is skipped elsewhere.  The recipe's module is
always checked to import without ray.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest


def test_recipe_imports_without_ray() -> None:
    code = ("import sys; import batched_fn.examples.ray_serve as r; "
            "assert 'ray' not in sys.modules; assert callable(r.build_app)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_asking_for_more_cpus_than_ray_has_is_an_error_not_a_hang(monkeypatch) -> None:
    pytest.importorskip("ray.serve")
    import ray

    from batched_fn.examples.ray_serve import build_app

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^invalid replicas value: 4 replicas x num_cpus=1 need 4 CPUs and Ray "
                                         r"has 2; ask for fewer"):
        build_app(4, num_cpus=1, model="toy")
    assert build_app(2, num_cpus=1, model="toy") is not None
    assert not ray.is_initialized()   # checking started nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_replicas_answer_with_each_requests_embedding() -> None:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    httpx = pytest.importorskip("httpx")
    np = pytest.importorskip("numpy")
    from batched_fn.examples.loadgen import sample_texts
    from batched_fn.examples.models import ToyEmbedder
    from batched_fn.examples.ray_serve import build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(2, num_cpus=0.5, model="toy", toy_dim=8, toy_batch_ms=20,
                                     max_batch_size=16, max_text_chars=200), route_prefix="/embed")
        url = f"http://127.0.0.1:{port}/embed"
        texts = sample_texts(64, seed=5)

        async def go() -> list[object]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                good = [client.post(url, json={"text": t}) for t in texts]
                bad = [client.post(url, json={"text": 1}), client.post(url, json={"text": "y" * 201})]
                return list(await asyncio.gather(*good, *bad))

        answers = asyncio.run(go())
        model = ToyEmbedder(dim=8)
        for text, answer in zip(texts, answers):
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(answer.json()["embedding"], model.embed([text])[0], atol=1e-12)
        assert answers[-2].status_code == 422
        assert answers[-1].status_code == 413
        stats = [handle.stats.remote().result() for _ in range(4)]
        assert any(s["batches"] < s["completed"] for s in stats), stats
    finally:
        serve.shutdown()
        ray.shutdown()
