"""What the HTTP server does for both APIs, over raw HTTP: framing byte by byte, Open WebUI's own calls,
limits, CORS, TLS, listening rules, a client that disconnects, streams that run side by side."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
import time

import pytest

from llm_supervisor.v1 import supervisor_pb2 as pb
from tests.conftest import HTTP, launch, model_table, wait_for
from tests.pki import make_pki

SLOW = "tests.engines:SlowEngine"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}]}


@pytest.fixture(scope="module")
def daemon(model_dir):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=1024), extra=HTTP)
    yield daemon
    daemon.stop()


def connect(url: str, timeout: float = 60) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def call(url: str, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = connect(url)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_sse_framing_byte_by_byte(daemon):
    status, headers, body = call(daemon.http_url, "POST", "/v1/chat/completions",
                                 {**CHAT, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    text = body.decode()
    assert re.fullmatch(r"(data: \{[^\n]*\}\n\n)+data: \[DONE\]\n\n", text), text
    events = [json.loads(line[len("data: "):]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_ndjson_framing_byte_by_byte_as_open_webui_streams_a_chat(daemon):
    # Open WebUI's calls, replayed: the version it parses, the models it lists, a streamed chat.
    status, _, body = call(daemon.http_url, "GET", "/api/version")
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+", json.loads(body)["version"])
    status, _, body = call(daemon.http_url, "GET", "/api/tags")
    assert [m["name"] for m in json.loads(body)["models"]] == ["tiny:latest"]
    status, headers, body = call(daemon.http_url, "POST", "/api/chat", {
        "model": "tiny:latest", "messages": [{"role": "user", "content": "Say hello"}], "stream": True,
        "options": {"num_predict": 8, "temperature": 0}})
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    text = body.decode()
    assert text.endswith("}\n") and "\n\n" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert all(set(line) >= {"model", "created_at", "message", "done"} for line in lines)
    last = lines[-1]
    assert last["done_reason"] == "length" and last["eval_count"] == 8
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[key], int), key
    assert last["total_duration"] >= last["prompt_eval_duration"] + last["eval_duration"]


def test_open_webui_unloads_with_keep_alive_0(model_dir):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256, keep_alive="-1"), extra=HTTP)
    try:
        status, _, body = call(daemon.http_url, "POST", "/api/generate", {"model": "tiny:latest", "keep_alive": 0})
        assert status == 200 and json.loads(body)["done_reason"] == "unload"
        wait_for(lambda: daemon.worker("tiny").pid == 0, 30, what="the worker to exit")
        assert json.loads(call(daemon.http_url, "GET", "/api/ps")[2])["models"] == []
        status, _, body = call(daemon.http_url, "POST", "/api/generate",  # the next request starts it again
                               {"model": "tiny:latest", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
        assert status == 200 and json.loads(body)["eval_count"] == 2
        # …and keep_alive 0 was that request's, not the model's from then on: the model's own applies.
        worker = daemon.worker("tiny")
        assert worker.pid != 0 and worker.unload_in_s == -1  # the config's keep_alive: never
    finally:
        daemon.stop()


@pytest.mark.parametrize("path, shape", [("/v1/chat/completions", "openai"), ("/api/chat", "ollama")])
def test_malformed_json_and_bad_fields_are_400_with_the_reason(daemon, path, shape):
    status, _, body = call(daemon.http_url, "POST", path, b'{"model": "tiny", "messages": [')
    error = json.loads(body)["error"]
    message = error["message"] if shape == "openai" else error
    assert status == 400 and "not valid JSON" in message and "line 1" in message
    status, _, body = call(daemon.http_url, "POST", path, {"model": "tiny", "messages": "hello"})
    error = json.loads(body)["error"]
    assert status == 400 and "messages" in (error["message"] if shape == "openai" else error)


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "prompt": "hi", "options": {"top_k": -1}}',
    b'{"model": "tiny", "prompt": "hi", "options": {"top_k": 3.5}}',
    b'{"model": "tiny", "prompt": "hi", "options": {"seed": Infinity}}',
    b'{"model": "tiny", "prompt": "hi", "options": {"num_predict": NaN}}',
    b'{"model": "tiny", "prompt": "hi", "options": {"temperature": NaN}}',
    b'{"model": "tiny", "prompt": "hi", "options": {"stop": 3}}',
    b'{"model": "tiny", "prompt": "hi", "format": "yaml"}',
    b'{"model": "tiny", "prompt": "", "keep_alive": true}',
    b'{"model": "tiny", "prompt": "", "keep_alive": "-soon"}',
    b"[" * 100_000,
])
def test_bad_values_are_400_never_500(daemon, body):
    status, _, reply = call(daemon.http_url, "POST", "/api/generate", body)
    assert status == 400, reply
    assert "http_handler_failed" not in daemon.log()


def test_a_body_over_max_message_size_is_413(model_dir):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256),
                    extra='max_message_size = "4KiB"\n' + HTTP)
    try:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 8192}]}
        for path in ("/v1/chat/completions", "/api/chat"):
            status, _, body = call(daemon.http_url, "POST", path, big)
            assert status == 413 and "max_message_size" in body.decode()
    finally:
        daemon.stop()


def test_a_full_queue_is_429_with_retry_after(model_dir):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=1024, parallel=1, max_queue=0, engine=SLOW),
                    extra=HTTP, env={"TEST_TOKEN_DELAY": "0.05"})
    try:
        busy = threading.Thread(target=call, args=(daemon.http_url, "POST", "/api/generate",
                                                   {"model": "tiny", "prompt": "hi", "options": {"num_predict": 40}}))
        busy.start()
        wait_for(lambda: daemon.worker("tiny").pool.sequences_active == 1, 30, what="the first request to run")
        status, headers, body = call(daemon.http_url, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["type"] == "rate_limit_error" and "queue is full" in body.decode()
        busy.join(60)
    finally:
        daemon.stop()


def test_cors_answers_allowed_origins_only(model_dir):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256),
                    extra=HTTP + 'cors_origins = ["https://chat.example.com", "chrome-extension://*"]\n')
    try:
        preflight = {"Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        status, headers, _ = call(daemon.http_url, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 204 and headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "POST" in headers["access-control-allow-methods"]
        status, _, _ = call(daemon.http_url, "OPTIONS", "/v1/chat/completions",
                            headers={**preflight, "Origin": "https://evil.example.com"})
        assert status == 403
        status, headers, _ = call(daemon.http_url, "GET", "/api/tags", headers={"Origin": "https://chat.example.com"})
        assert headers["access-control-allow-origin"] == "https://chat.example.com"
        status, headers, _ = call(daemon.http_url, "POST", "/api/chat", {**CHAT, "options": {"num_predict": 2}},
                                  headers={"Origin": "https://chat.example.com"})  # streamed: headers go early
        assert status == 200 and headers["access-control-allow-origin"] == "https://chat.example.com"
        # An origin not allowed is refused outright: a page's "simple" POST needs no preflight.
        status, headers, body = call(daemon.http_url, "POST", "/api/generate",
                                     b'{"model": "tiny", "prompt": "hi", "keep_alive": 0}',
                                     headers={"Origin": "https://evil.example.com", "Content-Type": "text/plain"})
        assert status == 403 and "cors_origins" in json.loads(body)["error"]
        assert "access-control-allow-origin" not in headers
        assert daemon.worker("tiny").requests_served == 1  # nothing ran: only the streamed chat above
        status, headers, _ = call(daemon.http_url, "GET", "/api/tags", headers={"Origin": "chrome-extension://abcdef"})
        assert status == 200 and headers["access-control-allow-origin"] == "chrome-extension://abcdef"
        # This machine's own origins (a local web UI, an editor's webview) need no setting, as in Ollama.
        status, headers, _ = call(daemon.http_url, "GET", "/api/tags", headers={"Origin": "http://localhost:3000"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        # DNS rebinding: a page whose name now resolves to 127.0.0.1 still sends its own name as Host.
        status, _, body = call(daemon.http_url, "GET", "/api/tags", headers={"Host": "evil.example.com:11434"})
        assert status == 403 and "not this machine" in json.loads(body)["error"]
        assert call(daemon.http_url, "GET", "/api/tags", headers={"Host": "localhost:11434"})[0] == 200
        assert call(daemon.http_url, "GET", "/api/tags", headers={"Host": "LOCALHOST."})[0] == 200
    finally:
        daemon.stop()


# Streams of 1,000 tokens at 50 ms each (SlowEngine): 50 s, unless something ends them. (path, body, SSE?)
LONG_STREAMS = (("/v1/chat/completions", {**CHAT, "max_tokens": 1000, "stream": True}, True),
                ("/api/chat", {**CHAT, "options": {"num_predict": 1000}}, False))


def slow_daemon(model_dir):
    return launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=2048, engine=SLOW), extra=HTTP,
                  env={"TEST_TOKEN_DELAY": "0.05"})


def open_stream(daemon, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A long stream, once its first frame has come: it is generating."""
    conn = connect(daemon.http_url)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().strip()
    return conn, response


def test_a_client_that_disconnects_frees_its_sequence(model_dir):
    daemon = slow_daemon(model_dir)
    try:
        for path, body, _ in LONG_STREAMS:
            served = daemon.worker("tiny").requests_served
            conn, _ = open_stream(daemon, path, body)
            assert daemon.worker("tiny").pool.sequences_active == 1
            gone = time.monotonic()
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            # 1,000 tokens at 50 ms would take 50 s: the sequence goes long before.
            wait_for(lambda: daemon.worker("tiny").pool.sequences_active == 0, 10, interval=0.01,
                     what="the disconnected stream's sequence to be freed")
            assert time.monotonic() - gone < 5
            assert daemon.worker("tiny").requests_served == served  # it was cut, not finished
            wait_for(lambda: '"status": 499' in daemon.log(), 10, what="the request logged as 499")
    finally:
        daemon.stop()


def test_four_http_streams_run_side_by_side(model_dir):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=1024, parallel=4, engine=SLOW), extra=HTTP,
                    env={"TEST_TOKEN_DELAY": "0.05"})
    try:
        results: list = []
        bodies = [("/v1/chat/completions", {**CHAT, "max_tokens": 30, "stream": True}),
                  ("/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 30, "stream": True}),
                  ("/api/chat", {**CHAT, "options": {"num_predict": 30}}),
                  ("/api/generate", {"model": "tiny", "prompt": "Once", "options": {"num_predict": 30}})]
        threads = [threading.Thread(target=lambda p=p, b=b: results.append(call(daemon.http_url, "POST", p, b)))
                   for p, b in bodies]
        for thread in threads:
            thread.start()
        wait_for(lambda: daemon.worker("tiny").pool.sequences_active == 4, 30, what="four sequences at once")
        for thread in threads:
            thread.join(60)
        assert [status for status, _, _ in results] == [200] * 4
    finally:
        daemon.stop()


def test_tokens_apply_to_http_with_the_same_roles(model_dir, tmp_path):
    (tmp_path / "inference").write_text("inference-token-0123456789\n")
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256),
                    extra=HTTP + f'[auth]\ninference_tokens_file = "{tmp_path / "inference"}"\n')
    try:
        assert call(daemon.http_url, "GET", "/api/version")[0] == 200  # open, as the health service is
        assert call(daemon.http_url, "GET", "/")[2] == b"Ollama is running"
        assert call(daemon.http_url, "HEAD", "/")[0] == 200
        status, _, body = call(daemon.http_url, "GET", "/api/tags")
        assert status == 401 and "Bearer" in json.loads(body)["error"]
        good = {"Authorization": "Bearer inference-token-0123456789"}
        assert call(daemon.http_url, "GET", "/api/tags", headers=good)[0] == 200
        status, _, body = call(daemon.http_url, "DELETE", "/api/delete", {"model": "tiny"}, headers=good)
        assert status == 403 and "admin" in json.loads(body)["error"]
        status, _, body = call(daemon.http_url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong-token-xx"})
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    finally:
        daemon.stop()


def test_tls_with_the_grpc_apis_files(model_dir, tmp_path):
    pki = make_pki(tmp_path)
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256),
                    extra=HTTP + f'[tls]\ncert = "{pki["server.crt"]}"\nkey = "{pki["server.key"]}"\n')
    try:
        url = daemon.http_url
        assert '"tls": true' in daemon.log()
        host, port = url.removeprefix("http://").rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        conn = http.client.HTTPSConnection("localhost", int(port), context=context, timeout=30)
        conn.request("GET", "/api/tags")
        assert conn.getresponse().status == 200
        conn.close()
        with pytest.raises(http.client.RemoteDisconnected):  # plaintext on the TLS port
            call(url, "GET", "/api/tags")
    finally:
        daemon.stop()


def test_listening_rules_are_start_up_errors_that_name_the_key(model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AssertionError, match=r"\[http\] address 127.0.0.1:%d: cannot listen" % port):
            launch(model_dir, extra=f'[http]\naddress = "127.0.0.1:{port}"\n')
    with pytest.raises(AssertionError, match=r"reachable from other machines.*insecure = true"):
        launch(model_dir, extra='[http]\naddress = "0.0.0.0:0"\n')
    daemon = launch(model_dir, extra='[http]\naddress = "0.0.0.0:0"\ninsecure = true\n')
    try:
        assert '"insecure_http"' in daemon.log()
    finally:
        daemon.stop()
    daemon = launch(model_dir, extra=HTTP, http_address="")  # --http-address '' turns it off
    try:
        assert '"http_listening"' not in daemon.log()
    finally:
        daemon.stop()


def test_the_embedded_default_serves_ollamas_port(model_dir):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 11434)) == 0:
            pytest.fail("something already listens on 127.0.0.1:11434 (an Ollama?): this test needs the port")
    daemon = launch(model_dir, config=False, embedded_http=True)
    try:
        assert daemon.http_url == "http://127.0.0.1:11434"
        status, _, body = call(daemon.http_url, "GET", "/api/tags")
        assert [m["name"] for m in json.loads(body)["models"]] == ["demo:latest"]
    finally:
        daemon.stop()


def test_a_worker_that_dies_mid_stream_ends_it_with_an_error_frame(model_dir):
    import os
    import signal

    daemon = slow_daemon(model_dir)
    try:
        for path, body, sse in LONG_STREAMS:
            wait_for(lambda: daemon.worker("tiny").state == "READY", 60, what="a serving worker")
            conn, response = open_stream(daemon, path, body)
            os.kill(daemon.worker("tiny").pid, signal.SIGKILL)
            rest = response.read().decode()
            conn.close()
            last = [line for line in rest.splitlines() if line.strip()][-1]
            error = json.loads(last.removeprefix("data: "))["error"]
            message = error["message"] if sse else error
            assert "died mid-request" in message and "SIGKILL" in message
            assert "[DONE]" not in rest and '"done":true' not in rest
    finally:
        daemon.stop()


def test_metrics_and_logs_label_requests_by_api(model_dir):
    from tests.test_metrics import free_port, scrape, value

    port = free_port()
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=512),
                    extra=HTTP + f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    try:
        list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(max_tokens=2))))
        assert call(daemon.http_url, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 2})[0] == 200
        assert call(daemon.http_url, "POST", "/v1/chat/completions", {**CHAT, "temperature": -1})[0] == 400
        for _ in range(2):
            assert call(daemon.http_url, "POST", "/api/chat", {**CHAT, "options": {"num_predict": 2}})[0] == 200
        samples = scrape(port)
        requests = "llm_supervisor_requests_total"
        assert value(samples, requests, model="tiny", code="OK", api="grpc") == 1
        assert value(samples, requests, model="tiny", code="OK", api="openai") == 1
        assert value(samples, requests, model="tiny", code="INVALID_ARGUMENT", api="openai") == 1
        assert value(samples, requests, model="tiny", code="OK", api="ollama") == 2
        logged = [json.loads(line) for line in daemon.log().splitlines() if '"http_request"' in line]
        assert {(entry["api"], entry["path"], entry["status"]) for entry in logged} >= {
            ("openai", "/v1/chat/completions", 200), ("openai", "/v1/chat/completions", 400), ("ollama", "/api/chat", 200)}
    finally:
        daemon.stop()


def test_configured_origins_match_with_star_only():
    from supervisor.api.http_server import origin_allowed

    assert origin_allowed("http://[fd00::5]:8080", ("http://[fd00::5]:8080",))  # brackets are brackets
    assert origin_allowed("chrome-extension://abc", ("chrome-extension://*",))
    assert origin_allowed("https://chat.example.com", ("https://*.example.com",))
    assert not origin_allowed("https://evil.com", ("https://*.example.com",))
    assert origin_allowed("http://localhost:3000", ()) and not origin_allowed("null", ())
