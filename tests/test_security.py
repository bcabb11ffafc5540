"""Who may connect and call: bearer tokens and their roles, TLS and mutual TLS, the unix socket's group."""

from __future__ import annotations

import grp
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_supervisor.v1 import supervisor_pb2 as pb
from llm_supervisor.v1 import supervisor_pb2_grpc
from supervisor.server.security import ADMIN, INFERENCE, Tokens, bearer, required_role, role_of
from tests.conftest import ROOT, launch, model_table
from tests.pki import make_pki

INFERENCE_TOKEN = "inference-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_section(base: Path) -> str:
    (base / "inference.tokens").write_text(f"# one per line\n{INFERENCE_TOKEN}\n")
    (base / "admin.tokens").write_text(f"{ADMIN_TOKEN}\n")
    return f'[auth]\ninference_tokens_file = "{base}/inference.tokens"\nadmin_tokens_file = "{base}/admin.tokens"\n'


def test_roles_of_methods_and_tokens():
    assert required_role("/llm_supervisor.v1.Supervisor/Generate") == INFERENCE
    assert required_role("/llm_supervisor.v1.Supervisor/LoadModel") == ADMIN
    assert required_role("/llm_supervisor.v1.Supervisor/NotYetWritten") == ADMIN  # unknown: the stricter role
    assert required_role("/grpc.health.v1.Health/Check") is None
    tokens = Tokens(inference=(b"i" * 16,), admin=(b"a" * 16,))
    assert role_of(b"a" * 16, tokens) == ADMIN and role_of(b"i" * 16, tokens) == INFERENCE
    assert role_of(b"x" * 16, tokens) is None and role_of(None, tokens) is None
    assert bearer([("authorization", "Bearer abc")]) == b"abc" and bearer([("authorization", "Basic abc")]) is None


# (method, request, role it needs); with the right token each gets past the check (then its own answer).
CALLS = [
    ("Generate", pb.GenerateRequest(model="tiny", prompt="hi", options=pb.SamplingOptions(max_tokens=1)), INFERENCE),
    ("Chat", pb.ChatRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="hi")],
                            options=pb.SamplingOptions(max_tokens=1)), INFERENCE),
    ("Tokenize", pb.TokenizeRequest(model="tiny", text="hi"), INFERENCE),
    ("Embed", pb.EmbedRequest(model="tiny", input=["hi"]), INFERENCE),
    ("ListModels", pb.ListModelsRequest(), INFERENCE),
    ("Status", pb.StatusRequest(), INFERENCE),
    ("EstimateModel", pb.EstimateModelRequest(path="tiny.gguf"), INFERENCE),
    ("WatchEvents", pb.WatchEventsRequest(model="tiny"), INFERENCE),
    ("LoadModel", pb.LoadModelRequest(name="other", path="missing.gguf"), ADMIN),
    ("UnloadModel", pb.UnloadModelRequest(name="missing"), ADMIN),
    ("RecycleModel", pb.RecycleModelRequest(name="missing"), ADMIN),
    ("StartModel", pb.StartModelRequest(name="missing"), ADMIN),
    ("StopModel", pb.StopModelRequest(name="missing"), ADMIN),
    ("TailModel", pb.TailModelRequest(name="tiny", lines=1), ADMIN),
    ("ReloadConfig", pb.ReloadConfigRequest(dry_run=True), ADMIN),
    ("ScanCatalog", pb.ScanCatalogRequest(find_stores=True), ADMIN),  # reads places outside model_dirs
]
STREAMS = {"Generate", "Chat", "WatchEvents", "TailModel"}


def call(daemon, method: str, request, token: str | None) -> grpc.StatusCode:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    rpc = getattr(daemon.stub, method)
    try:
        if method in STREAMS:
            for _ in rpc(request, metadata=metadata, timeout=5):
                if method == "WatchEvents":
                    break  # a follow never ends by itself: its first event is enough
        else:
            rpc(request, metadata=metadata, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_every_rpc_against_no_token_a_bad_token_the_wrong_role_and_the_right_one(model_dir, tmp_path):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256) + "\n" + auth_section(tmp_path))
    try:
        for method, request, role in CALLS:
            assert call(daemon, method, request, None) == grpc.StatusCode.UNAUTHENTICATED, method
            assert call(daemon, method, request, "not-a-token-of-ours-at-all") == grpc.StatusCode.UNAUTHENTICATED, method
            if role == ADMIN:
                assert call(daemon, method, request, INFERENCE_TOKEN) == grpc.StatusCode.PERMISSION_DENIED, method
            else:
                assert call(daemon, method, request, INFERENCE_TOKEN) not in (
                    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), method
            assert call(daemon, method, request, ADMIN_TOKEN) not in (
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), method
        # Probes and balancers send no token: the health service stays open.
        health = health_pb2_grpc.HealthStub(daemon.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        assert INFERENCE_TOKEN not in daemon.log() and ADMIN_TOKEN not in daemon.log()

        env = dict(os.environ, PYTHONPATH=str(ROOT))
        ctl = [sys.executable, "-m", "supervisor.ctl.main", "--address", daemon.address]
        refused = subprocess.run([*ctl, "--token-file", str(tmp_path / "inference.tokens"), "load", "x", "--path", "tiny.gguf"],
                                 capture_output=True, text=True, env=env)
        assert refused.returncode == 1 and "PERMISSION_DENIED: LoadModel needs an admin token" in refused.stderr
        allowed = subprocess.run([*ctl, "status"], capture_output=True, text=True,
                                 env={**env, "LLM_SUPERVISOR_TOKEN_FILE": str(tmp_path / "admin.tokens")})
        assert allowed.returncode == 0 and "tiny" in allowed.stdout
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def llmctl_tls(address: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.ctl.main", "--address", address, *flags, "status"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)


def test_tls_and_mutual_tls_and_plaintext_refused_on_the_tls_port(model_dir, pki):
    ca = pki["ca.crt"].read_bytes()
    tls = f'[tls]\ncert = "{pki["server.crt"]}"\nkey = "{pki["server.key"]}"\n'
    address, probes = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256) + "\n" + tls, address=address,
                    credentials=grpc.ssl_channel_credentials(root_certificates=ca), extra=f'health_address = "{probes}"')
    try:
        assert llmctl_tls(address, "--tls-ca", str(pki["ca.crt"])).returncode == 0
        plain = llmctl_tls(address)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr  # no TLS, no conversation
        # kubelet's gRPC probes speak no TLS: health_address answers health in plaintext, and nothing else.
        with grpc.insecure_channel(probes) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as api:
                supervisor_pb2_grpc.SupervisorStub(channel).Status(pb.StatusRequest(), timeout=10)
            assert api.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        daemon.stop()

    mutual = tls + f'client_ca = "{pki["ca.crt"]}"\n'
    address = f"127.0.0.1:{free_port()}"
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256) + "\n" + mutual, address=address,
                    credentials=grpc.ssl_channel_credentials(ca, pki["client.key"].read_bytes(), pki["client.crt"].read_bytes()))
    try:
        assert llmctl_tls(address, "--tls-ca", str(pki["ca.crt"])).returncode == 1  # no client certificate
        assert llmctl_tls(address, "--tls-ca", str(pki["ca.crt"]), "--tls-cert", str(pki["client.crt"]),
                          "--tls-key", str(pki["client.key"])).returncode == 0
    finally:
        daemon.stop()


def start_bare(model_dir: Path, base: Path, supervisor: str, address: str) -> subprocess.CompletedProcess:
    """Run the daemon until it exits on its own (a refused config)."""
    config = base / "config.toml"
    config.write_text(f'[supervisor]\naddress = "{address}"\nstate_dir = "{base}/state"\nruntime_dir = "{base}/run"\n'
                      f'model_dirs = ["{model_dir}"]\n{supervisor}\n')
    return subprocess.run([sys.executable, "-m", "supervisor.server.daemon", "--config", str(config)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=60)


def test_tcp_without_tls_needs_insecure_written_out_and_says_so_loudly(model_dir, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    refused = start_bare(model_dir, tmp_path, "", address)
    assert refused.returncode == 2 and "give [tls] cert and key, or write insecure = true" in refused.stderr
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256), extra="insecure = true", address=address)
    try:
        assert '"insecure_tcp"' in daemon.log() and '"level": "critical"' in daemon.log()
    finally:
        daemon.stop()


def test_the_unix_socket_belongs_to_the_configured_group(model_dir, tmp_path):
    group = next((g for g in ("daemon", "users", "nogroup") if g in {e.gr_name for e in grp.getgrall()}), None)
    if group is None:
        pytest.skip("no spare group on this machine")
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256), extra=f'socket_group = "{group}"')
    try:
        socket_path = daemon.address.removeprefix("unix://")
        assert os.stat(socket_path).st_gid == grp.getgrnam(group).gr_gid
        assert oct(os.stat(socket_path).st_mode & 0o777) == "0o660"
    finally:
        daemon.stop()
    unknown = start_bare(model_dir, tmp_path, 'socket_group = "no-such-group-here"', f"unix://{tmp_path}/s.sock")
    assert unknown.returncode == 2 and "socket_group 'no-such-group-here': no such group" in unknown.stderr


def test_what_a_client_may_send_is_bounded_with_clear_statuses(model_dir):
    daemon = launch(model_dir, model_table("tiny", "tiny.gguf", n_ctx=256, max_prompt_tokens=48, max_tokens=8),
                    extra='max_message_size = "64KiB"')
    try:
        def generate(prompt: str, max_tokens: int = 2):
            return list(daemon.stub.Generate(pb.GenerateRequest(model="tiny", prompt=prompt,
                                                                options=pb.SamplingOptions(max_tokens=max_tokens))))

        with pytest.raises(grpc.RpcError) as huge:
            generate("x" * (100 << 10))  # above max_message_size: refused before it is even read
        assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as long_prompt:
            generate("the model " * 40)
        assert long_prompt.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "takes at most 48 (max_prompt_tokens)" in long_prompt.value.details()
        with pytest.raises(grpc.RpcError) as too_many:
            generate("hi", max_tokens=9)
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "8" in too_many.value.details()
        assert generate("hi")[-1].usage.completion_tokens == 2  # and it still serves
        # A chat's history is fitted under the cap, the newest message kept.
        messages = [pb.ChatMessage(role="user", content="the model " * 10), pb.ChatMessage(role="assistant", content="ok"),
                    pb.ChatMessage(role="user", content="hi")]
        final = list(daemon.stub.Chat(pb.ChatRequest(model="tiny", messages=messages,
                                                     options=pb.SamplingOptions(max_tokens=2))))[-1]
        assert final.usage.prompt_tokens <= 48 and final.usage.messages_dropped == 2
    finally:
        daemon.stop()
