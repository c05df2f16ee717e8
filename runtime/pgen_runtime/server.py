"""An OpenAI-compatible HTTP server over `AsyncEngine` (aiohttp; the optional `server` extra).

Routes: POST /v1/completions and /v1/chat/completions (`stream: true` sends server-sent events),
GET /v1/models, /health, /metrics (Prometheus text). Invalid requests get a 4xx with an OpenAI-style
error body naming the parameter; the server goes on serving. SIGINT/SIGTERM stop it gracefully:
no new connections, in-flight requests finish (up to a timeout), then the engine thread stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from pathlib import Path

try:
    from aiohttp import web
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError("the pgen server needs aiohttp: pip install 'pgen[server]'") from err

from .async_engine import AsyncEngine, EngineDeadError
from .engine import Engine
from .engine_outputs import RequestOutput
from .errors import ConfigError, PgenError, ShapeError
from .sampling import SamplingParams

ENGINE = web.AppKey("engine", AsyncEngine)
MODEL = web.AppKey("model", str)
_ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def _error(message: str, status: int = 400, param: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


def _sampling_params(body: dict, default_max_tokens: int) -> SamplingParams:
    """SamplingParams from the OpenAI fields (and pgen's top_k, beam_width, stop_token_ids, ignore_eos)."""
    names = {"n": "n", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
             "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "stop": "stop",
             "stop_token_ids": "stop_token_ids", "beam_width": "beam_width", "ignore_eos": "ignore_eos"}
    args = {"temperature": 1.0, "max_tokens": default_max_tokens}
    for key, name in names.items():
        if body.get(key) is not None:
            args[name] = body[key]
    if isinstance(args.get("stop"), list) and not all(isinstance(s, str) for s in args["stop"]):
        raise RequestError(f"stop={args['stop']!r} must be a string or a list of strings", "stop")
    if "stop_token_ids" in args and not isinstance(args["stop_token_ids"], list):
        raise RequestError("stop_token_ids must be a list of integers", "stop_token_ids")
    try:
        return SamplingParams(**args)
    except ConfigError as err:  # its message starts with "name=value"
        raise RequestError(str(err), str(err).split("=")[0] if "=" in str(err) else None) from err


def _prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return prompt
    raise RequestError("prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _chat_prompt(body: dict) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", "messages")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise RequestError(f"messages: each needs a role in {_ROLES} and a string content; got {m!r:.80}",
                               "messages")
        lines.append(f"{m['role']}: {m['content']}\n")
    return "".join(lines) + "assistant:"


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine: AsyncEngine = request.app[ENGINE]
    try:
        body = await _body(request)
        prompt = _chat_prompt(body) if chat else _prompt(body)
        params = _sampling_params(body, 128 if chat else 16)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", "stream")
        outputs = engine.generate(prompt, params)
        first = await anext(outputs)  # validation errors surface here, before any byte is sent
    except RequestError as err:
        return _error(str(err), err.status, err.param)
    except (ShapeError, ConfigError) as err:
        return _error(str(err), 400, "prompt" if isinstance(err, ShapeError) else None)
    except EngineDeadError as err:
        return _error(str(err), 503)
    response = _Response(request, chat, stream, request.app[MODEL])
    async with contextlib.aclosing(outputs):
        return await response.run(first, outputs)


class _StepFailed(Exception):
    """A model step failed this request (the engine goes on serving the others)."""


class _Response:
    """Formats engine outputs as an OpenAI completion, or as a stream of chunks."""

    def __init__(self, request: web.Request, chat: bool, stream: bool, model: str) -> None:
        self.request, self.chat, self.stream, self.model = request, chat, stream, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.sent: dict[int, int] = {}

    async def run(self, first: RequestOutput, rest) -> web.StreamResponse:
        if not self.stream:
            last = first
            async for last in rest:
                pass
            if last.error is not None:
                return _error(last.error, 500)
            return web.json_response(self._full(last))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(self.request)
        try:
            await self._send(response, first)
            async for output in rest:
                await self._send(response, output)
        except (EngineDeadError, _StepFailed) as err:
            await response.write(f"data: {json.dumps({'error': {'message': str(err)}})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _full(self, output: RequestOutput) -> dict:
        choices = []
        for o in output.outputs:
            item = {"message": {"role": "assistant", "content": o.text}} if self.chat else {"text": o.text}
            choices.append({"index": o.index, **item, "finish_reason": o.finish_reason, "logprobs": None})
        used = sum(len(o.token_ids) for o in output.outputs)
        prompt = len(output.prompt_token_ids)
        return {**self._base(False), "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": used, "total_tokens": prompt + used}}

    async def _send(self, response: web.StreamResponse, output: RequestOutput) -> None:
        if output.error is not None:
            raise _StepFailed(output.error)
        for o in output.outputs:
            start = self.sent.get(o.index)
            delta = o.text[start or 0:]
            if start is not None and not delta and o.finish_reason is None:
                continue
            self.sent[o.index] = len(o.text)
            if self.chat:
                item = {"delta": ({"role": "assistant"} if start is None else {}) | ({"content": delta} if delta else {})}
            else:
                item = {"text": delta}
            chunk = {**self._base(True), "choices": [{"index": o.index, **item, "finish_reason": o.finish_reason}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if not engine.is_running:
        return web.json_response({"status": "error", "error": repr(engine.error)}, status=503)
    return web.json_response({"status": "ok"})


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": request.app[MODEL], "object": "model",
                                                          "owned_by": "pgen"}]})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text=prometheus_text(request.app[ENGINE]), content_type="text/plain",
                        headers={"X-Content-Type-Version": "0.0.4"})


def prometheus_text(engine: AsyncEngine) -> str:
    """The engine's gauges and counters in the Prometheus text format (version 0.0.4)."""
    kv, waiting, running = engine.snapshot
    stats = engine.engine.stats
    rows = [
        ("pgen_kv_cache_utilization", "gauge", "Share of usable KV blocks in use.", kv.blocks_used / kv.num_blocks),
        ("pgen_kv_slot_utilization", "gauge", "Live token slots / allocated token slots.", kv.utilization),
        ("pgen_prefix_cache_hit_rate", "gauge", "Cached blocks found / blocks looked up.", kv.prefix_hit_rate),
        ("pgen_prefix_cache_hits_total", "counter", "Prefix-cache block hits.", kv.prefix_hits),
        ("pgen_preemptions_total", "counter", "Sequences preempted (swap or recompute).", kv.swaps_out + kv.recomputes),
        ("pgen_requests_waiting", "gauge", "Sequences queued for admission.", waiting),
        ("pgen_requests_running", "gauge", "Sequences holding KV blocks.", running),
        ("pgen_generation_tokens_per_second", "gauge", "Generated tokens/s over the last 10 s.", stats.tokens_per_s),
        ("pgen_generation_tokens_total", "counter", "Generated tokens.", stats.tokens_generated),
        ("pgen_requests_finished_total", "counter", "Requests completed.", stats.requests_finished),
        ("pgen_requests_aborted_total", "counter", "Requests aborted (client gone, shutdown).", stats.requests_aborted),
        ("pgen_requests_failed_total", "counter", "Requests failed by a model step that raised.", stats.requests_failed),
    ]
    return "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {float(v):.6g}\n" for n, t, h, v in rows)


@web.middleware
async def _errors(request: web.Request, handler):
    """Turn aiohttp's HTML errors (404, 405, 413) into JSON errors, and never leak a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _error(err.reason if err.text is None else err.text, err.status)


def make_app(engine: AsyncEngine, model_name: str) -> web.Application:
    """The aiohttp application; starts the engine thread on startup and stops it on cleanup."""
    app = web.Application(middlewares=[_errors], client_max_size=4 << 20)
    app[ENGINE], app[MODEL] = engine, model_name

    async def start(app: web.Application) -> None:
        engine.start()

    async def stop(app: web.Application) -> None:
        engine.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


def serve(package: str | Path, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 10.0,
          **engine_args) -> None:
    """Load `package` and serve it until SIGINT/SIGTERM (see `Engine` for engine_args)."""
    engine = AsyncEngine(Engine(package, **engine_args))
    name = Path(package).name.split(".")[0]
    web.run_app(make_app(engine, name), host=host, port=port, shutdown_timeout=shutdown_timeout,
                print=lambda line: print(f"pgen serve: {name} on http://{host}:{port}", flush=True),
                access_log=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", help="NAME.pgenpkg written by pgen compile-model (or pgen run)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:N for a package with a CUDA target")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks per layer (default: 4096 tokens)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=None)


def main(argv: list[str] | None = None, prog: str = "python -m pgen_runtime.server") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve(args.package, args.host, args.port, device=args.device, num_blocks=args.num_blocks,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len)
    except PgenError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
