"""The HTTP server on loopback, started and stopped by the tests: OpenAI routes, streams, load, errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")

from pgen.tiny import TinyConfig  # noqa: E402
from pgen_runtime import LLM, SamplingParams  # noqa: E402

from tiny_models import build_tiny  # noqa: E402

TIMEOUT = aiohttp.ClientTimeout(total=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build_tiny(TinyConfig(), str(tmp_path_factory.getbasetemp()))[1]


@pytest.fixture(scope="module")
def server(package):
    """(base url, process) of `pgen serve` on 127.0.0.1; stopped by SIGTERM, which must exit 0."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pgen.cli", "serve", str(package), "--host", "127.0.0.1",
                             "--port", str(port), "--num-blocks", "129"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TVM_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not come up: {proc.communicate()[0][-2000:]}")
        time.sleep(0.2)
    yield url, proc
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(30) == 0, proc.communicate()[0][-2000:]
    finally:
        proc.kill()


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _post(session, url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


async def _stream(session, url: str, body: dict) -> list[dict]:
    events = []
    async with session.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_is_greedy_generate(server, package):
    url, _ = server
    prompts = ["Paged attention", "A longer prompt that spans more than one block of sixteen bytes."]
    expected = LLM(package).generate(prompts, SamplingParams(max_tokens=20))

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            return [await _post(s, f"{url}/v1/completions", {"prompt": p, "max_tokens": 20, "temperature": 0})
                    for p in prompts]

    for (status, body), want in zip(run(main()), expected):
        assert status == 200, body
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == want.text
        assert body["choices"][0]["finish_reason"] == want.finish_reason
        assert body["usage"]["completion_tokens"] == len(want.token_ids)


def test_streams_equal_the_full_answers(server):
    url, _ = server
    body = {"prompt": "stream me", "max_tokens": 24, "temperature": 0.7, "seed": 3, "n": 2}
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0}

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            full = await _post(s, f"{url}/v1/completions", body)
            chunks = await _stream(s, f"{url}/v1/completions", body)
            chat_full = await _post(s, f"{url}/v1/chat/completions", chat)
            chat_chunks = await _stream(s, f"{url}/v1/chat/completions", chat)
            return full, chunks, chat_full, chat_chunks

    (status, full), chunks, (chat_status, chat_full), chat_chunks = run(main())
    assert status == 200 and chat_status == 200
    for choice in full["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"] and len(mine) > 1
    deltas = [c["choices"][0]["delta"] for c in chat_chunks]
    assert deltas[0]["role"] == "assistant" and chat_chunks[0]["object"] == "chat.completion.chunk"
    assert "".join(d.get("content", "") for d in deltas) == chat_full["choices"][0]["message"]["content"]


def test_sixty_four_concurrent_clients_get_the_sequential_answers(server, package):
    url, _ = server
    prompts = [f"client {i} asks" for i in range(8)]
    expected = [o.text for o in LLM(package).generate(prompts, SamplingParams(max_tokens=16))]

    async def one(s, i: int) -> str:  # odd clients stream, even ones wait for the whole answer
        body = {"prompt": prompts[i % 8], "max_tokens": 16, "temperature": 0}
        if i % 2:
            return "".join(c["choices"][0]["text"] for c in await _stream(s, f"{url}/v1/completions", body))
        status, answer = await _post(s, f"{url}/v1/completions", body)
        assert status == 200, answer
        return answer["choices"][0]["text"]

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0)) as s:
            return await asyncio.gather(*(one(s, i) for i in range(64)))

    assert run(main()) == [expected[i % 8] for i in range(64)]


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ("[1, 2]", None),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x" * 5000, "max_tokens": 4}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
])
def test_malformed_requests_get_4xx_and_the_server_goes_on(server, body, param):
    url, _ = server

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            status, error = await _post(s, f"{url}/v1/completions", body)
            ok = await _post(s, f"{url}/v1/completions", {"prompt": "still here", "max_tokens": 2})
            return status, error, ok

    status, error, ok = run(main())
    assert status == 400 and error["error"]["message"], error
    if param:
        assert param in error["error"]["message"] or error["error"]["param"] == param, error
    assert ok[0] == 200


def test_chat_errors_routes_health_and_metrics(server):
    url, _ = server

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            bad_chat = await _post(s, f"{url}/v1/chat/completions", {"messages": [{"role": "robot", "content": 1}]})
            async with s.get(f"{url}/v1/nothing") as r:
                missing = r.status, await r.json()
            async with s.get(f"{url}/health") as r:
                health = r.status
            async with s.get(f"{url}/metrics") as r:
                metrics = await r.text()
            return bad_chat, missing, health, metrics

    (chat_status, chat_error), (missing_status, missing), health, metrics = run(main())
    assert chat_status == 400 and "messages" in chat_error["error"]["message"]
    assert missing_status == 404 and missing["error"]["code"] == 404
    assert health == 200
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    for name in ("pgen_kv_cache_utilization", "pgen_prefix_cache_hit_rate", "pgen_preemptions_total",
                 "pgen_requests_waiting", "pgen_generation_tokens_per_second"):
        assert name in values, metrics
    assert values["pgen_generation_tokens_total"] > 0


def test_a_client_that_leaves_mid_stream_is_aborted(server):
    url, _ = server

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.post(f"{url}/v1/completions", json={"prompt": "long", "max_tokens": 400, "stream": True,
                                                             "ignore_eos": True}) as r:
                await r.content.readline()
            for _ in range(100):  # bounded: the abort reaches the engine within a few steps
                async with s.get(f"{url}/metrics") as m:
                    text = await m.text()
                if "pgen_requests_aborted_total 0" not in text and "pgen_requests_running 0" in text:
                    return text
                await asyncio.sleep(0.1)
            return text

    text = run(main())
    assert "pgen_requests_aborted_total 0\n" not in text and "pgen_requests_running 0\n" in text, text


def test_a_failing_model_step_fails_its_requests_with_500_and_the_server_goes_on(package):
    """A step that raises (here: a model that refuses a poisoned token) fails the requests it ran,
    drops their blocks from the prefix cache, and the engine serves the next requests."""
    from aiohttp.test_utils import TestClient, TestServer

    from pgen_runtime import Engine
    from pgen_runtime.async_engine import AsyncEngine
    from pgen_runtime.server import make_app

    engine = Engine(package, num_blocks=65)
    poison = engine.tokenizer.encode("~")[0]
    forward = engine.model.forward

    def faulty(step):
        if poison in step.input_ids:
            raise RuntimeError("injected fault")
        return forward(step)

    engine.model.forward = faulty
    expected = LLM(package).generate(["Hello"], SamplingParams(max_tokens=8))[0].text

    async def main():
        async with TestClient(TestServer(make_app(AsyncEngine(engine), "tiny"))) as client:
            prompt = "a shared opening of two blocks, then the poison: ~"
            r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8})
            failed = (r.status, await r.json())
            stream = []
            async with client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "stream": True}) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        stream.append(line[6:].decode().strip())
            r = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})
            ok = (r.status, await r.json())
            health = (await client.get("/health")).status
            metrics = await (await client.get("/metrics")).text()
            return failed, stream, ok, health, metrics

    (status, body), stream, (ok_status, ok_body), health, metrics = run(main())
    assert status == 500 and "injected fault" in body["error"]["message"], body
    assert "injected fault" in json.loads(stream[-2])["error"]["message"] and stream[-1] == "[DONE]", stream
    assert ok_status == 200 and ok_body["choices"][0]["text"] == expected
    assert health == 200 and "pgen_requests_failed_total 2\n" in metrics
    assert engine.manager.metrics().blocks_used == 0
    assert not engine.manager.block_pool.cached, "a failed step's blocks must not serve later prompts"
