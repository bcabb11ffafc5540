"""llmctl — drive llm-supervisord from a shell.

    llmctl [--address ADDR] [--json] COMMAND ...
    llmctl [--address ADDR]                    an interactive shell of the same commands

The address is --address, else $LLM_SUPERVISOR_ADDRESS, else the daemon's default unix socket.
Exit status: 0 on success, 1 with the server's message on any error, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
import psutil

from supervisor.settings.config import Host, default_address
from supervisor.server.security import token_lines
from . import commands
from .shell import Shell


# round_robin over every address, skipping daemons whose health says NOT_SERVING (a draining one), and
# retrying UNAVAILABLE on another while nothing of the reply has come: gRPC's own machinery.
SERVICE_CONFIG = (Path(__file__).parent / "service_config.json").read_text()


def resolve_address(flag: str | None, env: dict[str, str]) -> str:
    """A gRPC target: unix:///path, host:port, dns:///name:port, or several host:port joined by commas."""
    address = flag or env.get("LLM_SUPERVISOR_ADDRESS") or default_address(
        Host(memory_bytes=psutil.virtual_memory().total, is_root=os.geteuid() == 0, env=env))
    if "," in address and ":///" not in address and not address.startswith(("ipv4:", "ipv6:")):
        return ("ipv6:" if address.startswith("[") else "ipv4:") + address  # gRPC's own list syntax
    return address


def sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=0, help="most tokens to generate (0: until the end)")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repeat-penalty", type=float)
    parser.add_argument("--frequency-penalty", type=float)
    parser.add_argument("--presence-penalty", type=float)
    parser.add_argument("--seed", type=int, help="fixed seed: the same request gives the same text")
    constraint = parser.add_mutually_exclusive_group()
    constraint.add_argument("--grammar", type=Path, metavar="FILE", help="a GBNF grammar (root rule `root`) the output follows")
    constraint.add_argument("--json-schema", type=Path, metavar="FILE", help="a JSON schema the output follows")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeatable)")
    parser.add_argument("--keep-alive", default="", metavar="DURATION",
                        help="keep the model loaded this long after the request: 5m, 0 (unload), -1 (forever)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="unix:///path/to.sock, host:port, dns:///name:port, or host:port,host:port,… "
                        "(round_robin over them, draining daemons skipped, UNAVAILABLE retried on another)")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout, for scripts")
    parser.add_argument("--token-file", type=Path, help="a file holding the bearer token to send "
                        "(else $LLM_SUPERVISOR_TOKEN_FILE); never the token itself on the command line")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate to check a TLS daemon's certificate with")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, for a daemon that wants mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="the client certificate's key")
    parser.add_argument("--tls-server-name", help="the name the daemons' certificate is for, when the address "
                        "does not say it (several addresses, an IP)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("status", help="every worker (or MODEL's): state, pid, memory, requests, uptime")
    p.add_argument("model", nargs="?", default="")
    p = sub.add_parser("models", help="loaded models and their settings, and the models on disk a request would load")
    p.add_argument("--available", action="store_true", help="only the models on disk that are not loaded")

    p = sub.add_parser("catalog", help="read the model directories afresh: what they offer and what was skipped, "
                       "and with --scan the Ollama stores on the daemon's host not yet served (admin)")
    p.add_argument("--scan", nargs="*", metavar="DIR", default=None,
                   help="also look for Ollama stores: $OLLAMA_MODELS, /usr/share/ollama/.ollama/models and "
                        "~/.ollama/models as the daemon sees them, and each DIR given")
    p = sub.add_parser("load", help="load a GGUF from a model directory under NAME")
    p.add_argument("name")
    p.add_argument("--path", required=True, help="GGUF file, relative to a model directory")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a [models.NAME] key (repeatable)")

    p = sub.add_parser("estimate", help="what a GGUF would cost in memory with these options, without loading it")
    p.add_argument("path", help="GGUF file, relative to a model directory")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a [models.NAME] key (repeatable)")

    p = sub.add_parser("unload", help="stop a model's worker and forget it")
    p.add_argument("name")

    p = sub.add_parser("generate", help="complete PROMPT, streaming the text as it comes")
    p.add_argument("model")
    p.add_argument("prompt")
    sampling_flags(p)

    p = sub.add_parser("chat", help="interactive chat with MODEL (its chat template); keeps the history")
    p.add_argument("model")
    p.add_argument("--system", help="a system message to start the chat with")
    sampling_flags(p)

    p = sub.add_parser("recycle", help="graceful: the worker finishes its request, a fresh one takes the next")
    p.add_argument("model")
    p = sub.add_parser("restart", help="hard: kill the worker now (its request fails) and start a fresh one")
    p.add_argument("model")

    p = sub.add_parser("start", help="start MODEL's worker now (a STOPPED or FATAL model too)")
    p.add_argument("model")
    p = sub.add_parser("stop", help="drain and stop MODEL's worker; it stays STOPPED until `start`")
    p.add_argument("model")

    p = sub.add_parser("tail", help="MODEL's recent worker output (llama.cpp's log)")
    p.add_argument("model")
    p.add_argument("-n", "--lines", type=int, default=20, help="this many last lines (0: all kept, up to 500)")
    p.add_argument("-f", "--follow", action="store_true", help="then follow new lines until interrupted")

    p = sub.add_parser("top", help="status refreshed live: memory, GPU, temperature, tokens/s")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS")
    p.add_argument("--iterations", type=int, default=0, metavar="N", help="stop after N refreshes (0: never)")

    sub.add_parser("reread", help="show what changed in the config file, without applying it")
    sub.add_parser("update", help="apply the config file: load added models, drain removed ones, apply changes")

    p = sub.add_parser("health", help="grpc.health.v1 status, overall and per model; exit 1 unless all serve")
    p.add_argument("model", nargs="?", default="", help="only this model's")

    p = sub.add_parser("events", help="follow the supervisor's decisions and state changes as they happen")
    p.add_argument("model", nargs="?", default="", help="only this model's")

    p = sub.add_parser("embed", help="a vector per TEXT from an embedding MODEL, one JSON array a line")
    p.add_argument("model")
    p.add_argument("text", nargs="+")
    p.add_argument("--truncate", action="store_true", help="cut a text longer than the context instead of failing")
    p.add_argument("--keep-alive", default="", metavar="DURATION",
                   help="keep the model loaded this long after the request: 5m, 0 (unload), -1 (forever)")

    p = sub.add_parser("tokenize", help="count (and list) the tokens of TEXT for MODEL")
    p.add_argument("model")
    p.add_argument("text")
    p.add_argument("--no-special", action="store_true", help="without BOS and the like")
    return parser


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


BALANCING = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]


def balancing(target: str) -> list[tuple[str, object]]:
    """The balancing service config for a target that names several daemons (a list, a DNS name). One
    daemon gets none: health checking would fail calls fast while its only model is being recycled,
    where waiting for the replacement is right."""
    several = target.startswith(("ipv4:", "ipv6:", "dns:")) and ("," in target or target.startswith("dns:"))
    return BALANCING if several else []


def open_channel(args: argparse.Namespace, address: str, env: dict[str, str]) -> grpc.Channel:
    """TLS when --tls-ca (or a client certificate) is given, the token file's token on every call."""
    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise commands.UsageError(f"{what} {path}: {e.strerror}") from None

    if (args.tls_cert is None) != (args.tls_key is None):
        raise commands.UsageError("--tls-cert and --tls-key go together")
    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.tls_ca, "--tls-ca") if args.tls_ca else None,
            private_key=read(args.tls_key, "--tls-key") if args.tls_key else None,
            certificate_chain=read(args.tls_cert, "--tls-cert") if args.tls_cert else None)
        name = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(address, credentials, options=balancing(address) + name)
    else:
        channel = grpc.insecure_channel(address, options=balancing(address))
    token_file = args.token_file or (Path(env["LLM_SUPERVISOR_TOKEN_FILE"]) if env.get("LLM_SUPERVISOR_TOKEN_FILE") else None)
    if token_file is not None:
        tokens = token_lines(read(token_file, "--token-file").decode())
        if not tokens:
            raise commands.UsageError(f"--token-file {token_file} holds no token")
        channel = grpc.intercept_channel(channel, _Bearer(tokens[0]))
    return channel


def execute(args: argparse.Namespace, channel: grpc.Channel, address: str) -> int:
    """One command; errors are printed, and the exit status says which kind."""
    out = commands.Output(sys.stdout, as_json=args.json)
    try:
        return commands.run(args, channel, out)
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or ""):
            details = f"cannot reach llm-supervisord at {address}: {details}"
        print(f"llmctl: {code.name}: {details}", file=sys.stderr)
        return 1
    except commands.UsageError as e:
        print(f"llmctl: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    address = resolve_address(args.address, dict(os.environ))
    try:
        channel = open_channel(args, address, dict(os.environ))
    except commands.UsageError as e:
        print(f"llmctl: {e}", file=sys.stderr)
        return 2
    with channel:
        if args.command is not None:
            try:
                return execute(args, channel, address)
            except KeyboardInterrupt:
                return 130
        shell = Shell(parser, lambda line_args: execute(line_args, channel, address))
        while True:
            try:
                shell.cmdloop()
                return shell.status
            except KeyboardInterrupt:  # ^C at the prompt drops the line, as a shell does
                shell.stdout.write("^C\n")
                shell.intro = None


if __name__ == "__main__":
    sys.exit(main())
