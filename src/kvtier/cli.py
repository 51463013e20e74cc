"""The ``kvtier`` command: serve, config check, stats, admin, demo, bench, advise.

A mistake the user can fix (bad arguments, a bad config file, a model folder in the way) prints one
line ``kvtier: error: ...`` and a hint, and exits 2; a server that fails or cannot be reached
exits 1 the same way; Ctrl-C exits 130. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import TypeAlias

from kvtier.argtypes import CommandError, port, positive_int
from kvtier.errors import ConfigError, KVTierError, ModelError

DEFAULT_METRICS_URL = "http://127.0.0.1:9464/metrics"
DEFAULT_ADMIN_URL = "http://127.0.0.1:9401"


def build_parser() -> argparse.ArgumentParser:
    from kvtier import __version__

    parser = argparse.ArgumentParser(prog="kvtier", description="A tiered KV-cache layer for vLLM.")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(commands)
    _add_config(commands)
    _add_stats(commands)
    _add_admin(commands)
    _add_demo(commands)
    _add_bench(commands)
    _add_advise(commands)
    _add_proxy(commands)
    _add_token(commands)
    return parser


Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_serve(commands: Commands) -> None:
    serve = commands.add_parser(
        "serve", allow_abbrev=False, help="run vLLM's OpenAI server with the kvtier connector",
        description="Run `python -m vllm.entrypoints.openai.api_server --model MODEL --kv-transfer-config "
                    "...` with kvtier plugged in. MODEL comes first; arguments kvtier does not know are "
                    "passed to vLLM, e.g. --max-model-len 4096 --enforce-eager --block-size 128.",
        epilog="example: kvtier serve ./models/smollm2-135m-instruct --config kvtier.yaml --port 8000 "
               "--max-model-len 4096 --enforce-eager")
    serve.add_argument("model", metavar="MODEL", help="model folder or name, as vLLM's --model")
    serve.add_argument("--config", metavar="FILE", help="kvtier YAML config, checked before vLLM starts "
                                                        "(this is kvtier's file, not vLLM's --config)")
    serve.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="inline",
                       help="one kvtier config key, e.g. --set memory.capacity=4GiB (repeatable; "
                            "overrides the file)")
    serve.add_argument("--port", type=port, help="the server's HTTP port (vLLM's default: 8000)")
    serve.add_argument("--role", choices=("both", "producer", "consumer"), default="both",
                       help="disaggregated prefill: producer = a prefill instance, consumer = a decode "
                            "instance (see kvtier proxy); default: both")
    serve.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def _add_proxy(commands: Commands) -> None:
    proxy = commands.add_parser(
        "proxy", help="one endpoint in front of vLLM instances (disaggregated prefill, routing)",
        description="Serve the OpenAI API in front of instances. With --prefill, each completion is "
                    "prefilled (one token) by a prefill instance (kvtier serve --role producer), whose KV "
                    "reaches the decode instance (kvtier serve --role consumer) through the shared remote "
                    "tier; the decode instance's answer is relayed. The client's Authorization header is "
                    "passed on.",
        epilog="example: kvtier proxy --prefill http://10.0.0.1:8001 --decode http://10.0.0.2:8002 --port 8000")
    proxy.add_argument("--prefill", metavar="URL", action="append", default=[],
                       help="a prefill instance, http://host:port (repeatable: round-robin; none: no prefill step)")
    proxy.add_argument("--decode", "--instance", metavar="URL", action="append", required=True, dest="decode",
                       help="an instance that answers, http://host:port (repeatable)")
    proxy.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    proxy.add_argument("--port", type=port, default=8000, help="port to listen on (default: 8000)")
    proxy.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                       help="per request to an instance (default: 600)")
    proxy.add_argument("--max-concurrency", type=int, default=256, metavar="N",
                       help="requests relayed at once; up to 4x as many wait, more get 503 (default: 256)")
    proxy.add_argument("--events", metavar="ENDPOINT", action="append", default=[],
                       help="an instance's KV events, tcp://host:port (its --kv-events-config endpoint; one per "
                            "--instance, same order): route each request to the instance holding its longest "
                            "cached prefix on any tier, balanced by queue length (default: round-robin)")


def _add_config(commands: Commands) -> None:
    config = commands.add_parser("config", help="work with kvtier config files",
                                 description="Work with kvtier config files.")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="validate a config file and show every key with its value and source",
        description="Load FILE as the connector would (defaults < FILE < KVTIER_* environment variables), "
                    "print every key, its value and where it came from, then check what start-up checks "
                    "on this machine: the disk folder can be written, key and tokens files load, the "
                    "audit log and TLS files can be used. Exits 2 naming each key that would fail.",
        epilog="Run it as the user and on the machine the engine runs on: files and folders are checked "
               "with this process's permissions.")
    check.add_argument("file", metavar="FILE", help="kvtier YAML config")
    check.add_argument("--block-size", type=positive_int, metavar="N",
                       help="the engine's --block-size: chunk_tokens must be a multiple of it")
    check.add_argument("--connect", action="store_true",
                       help="also make one round trip to the remote tier (remote.url), as the engine would")


def _add_stats(commands: Commands) -> None:
    stats = commands.add_parser(
        "stats", help="show kvtier's counters from a running engine",
        description="Fetch kvtier's Prometheus metrics from a running engine (kvtier's metrics.port, or "
                    "vLLM's own /metrics: http://HOST:PORT/metrics, engines summed) "
                    "and print the kvtier_* series per tier.")
    stats.add_argument("--url", default=DEFAULT_METRICS_URL, help=f"metrics URL (default: {DEFAULT_METRICS_URL})")


def _add_token(commands: Commands) -> None:
    token = commands.add_parser(
        "token", help="issue a signed namespace token (signing.key_file / signing.key_env)",
        description="Print a namespace token for a tenant: HMAC-SHA256 under the engines' signing key, "
                    "valid for --ttl seconds. A request sends it as kv_transfer_params "
                    '{"kvtier": {"namespace_token": TOKEN}}. See docs/security.md.')
    token.add_argument("--namespace", required=True)
    token.add_argument("--ttl", type=positive_int, default=86400, metavar="SECONDS",
                       help="how long the token is valid (default: 86400)")
    source = token.add_mutually_exclusive_group(required=True)
    source.add_argument("--key-file", metavar="FILE", help="file holding the signing key")
    source.add_argument("--key-env", metavar="VAR", help="environment variable holding the signing key")


def cmd_token(args: argparse.Namespace) -> int:
    import time

    from kvtier.signing import NamespaceClaim, load_signing_key, sign_namespace

    key = load_signing_key(args.key_file, args.key_env, os.environ)
    assert key is not None  # argparse requires one source
    try:
        print(sign_namespace(key, NamespaceClaim(args.namespace, int(time.time()) + args.ttl)))
    except ValueError:
        raise CommandError(f"{args.namespace!r} is not a namespace",
                           "a namespace is 1 to 64 of A-Z a-z 0-9 _ . -, not starting with .") from None
    return 0


def _add_admin(commands: Commands) -> None:
    admin = commands.add_parser(
        "admin", help="call a running engine's admin API (stats, lookup, invalidate, limits)",
        description="Call the admin API of an engine running kvtier (config key admin.port) and print "
                    "its JSON answer. The bearer token comes from --token-file or the environment "
                    "variable named by --token-env. See docs/security.md.")
    admin.add_argument("--url", default=DEFAULT_ADMIN_URL, help=f"admin API address (default: {DEFAULT_ADMIN_URL})")
    source = admin.add_mutually_exclusive_group(required=True)
    source.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    source.add_argument("--token-env", metavar="VAR", help="environment variable holding the bearer token")
    actions = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    for name, text in (("health", "is the engine's kvtier up"), ("stats", "entries per tier and namespace"),
                       ("namespaces", "TTL, quotas and usage per namespace")):
        actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    lookup = actions.add_parser("lookup", help="how much of a prompt each tier holds")
    invalidate = actions.add_parser(
        "invalidate", help="remove a namespace, a token prefix or keys from every tier",
        description="Remove NAMESPACE's entries from memory, disk and the remote tier: all of them, the "
                    "chunks of a token prefix (--token-ids), or listed chunk keys (--keys).")
    for action in (lookup, invalidate):
        action.add_argument("--namespace", required=True)
        action.add_argument("--salt", help="vLLM's cache_salt of the prompt, if it had one")
    lookup.add_argument("--token-ids", metavar="FILE", required=True, help="JSON file: a list of token ids")
    which = invalidate.add_mutually_exclusive_group()
    which.add_argument("--token-ids", metavar="FILE", help="JSON file: a list of token ids (the prefix)")
    which.add_argument("--keys", metavar="HEX", nargs="+", help="chunk keys (32 hex digits each)")
    limits = actions.add_parser("limits", help="set a namespace's TTL and quotas (until the engine restarts)")
    limits.add_argument("--namespace", required=True)
    limits.add_argument("--ttl", type=int, metavar="SECONDS", help="entry lifetime (0: none)")
    limits.add_argument("--memory-quota", metavar="SIZE", help="e.g. 4GiB (0: none)")
    limits.add_argument("--disk-quota", metavar="SIZE", help="e.g. 50GiB (0: none)")


def _add_demo(commands: Commands) -> None:
    demo = commands.add_parser(
        "demo", help="compare TTFT of vLLM alone and vLLM + kvtier on a multi-user chat",
        description="Start vLLM twice (without and with kvtier) with a deliberately small KV cache, run "
                    "the same multi-user chat on each, and report time to first token, kvtier's hit "
                    "rates and bytes moved. Writes OUT_DIR/results.json and OUT_DIR/ttft_per_round.png. "
                    "About 1.5 minutes on 2 CPU cores, plus 20 s to prepare SmolLM2 the first time.")
    demo.add_argument("--models-dir", default="models", metavar="DIR",
                      help="where models are prepared and kept (default: ./models)")
    demo.add_argument("--out-dir", default=os.path.join("out", "demo"), metavar="DIR",
                      help="where results, plot and server logs go (default: ./out/demo)")
    demo.add_argument("--users", type=positive_int, help="concurrent chat users (default: 4; --quick: 3)")
    demo.add_argument("--rounds", type=positive_int, help="questions per user (default: 3; --quick: 2)")
    demo.add_argument("--quick", action="store_true", help="fewer users and rounds (for CI)")
    demo.add_argument("--tiny", action="store_true",
                      help="use a tiny random model instead of SmolLM2-135M (for CI; answers are noise)")
    demo.add_argument("--port", type=port, help="the vLLM server's port (default: any free port)")
    demo.add_argument("--startup-timeout", type=positive_int, default=300, metavar="SECONDS",
                      help="how long to wait for each server to become healthy (default: 300)")


def _add_bench(commands: Commands) -> None:
    from kvtier.bench.options import add_bench_parser

    add_bench_parser(commands)


def _add_advise(commands: Commands) -> None:
    from kvtier.advisor.command import add_advise_parser

    add_advise_parser(commands)


def cmd_serve(args: argparse.Namespace, engine_args: list[str]) -> int:
    from kvtier import serve

    config_path = os.path.abspath(args.config) if args.config else None
    inline = serve.parse_inline(args.inline)
    serve.check_config(config_path, inline, os.environ)
    argv = serve.server_command(args.model, config_path, inline, args.port, engine_args, args.role)
    if args.dry_run:
        print(" ".join(_quote(arg) for arg in argv))
        return 0
    serve.exec_server(argv)
    return 0  # not reached


def cmd_proxy(args: argparse.Namespace) -> int:
    import threading

    from kvtier.proxy import Proxy, ProxySettings, Upstream, serve

    try:
        prefill = [Upstream.parse(url) for url in args.prefill]
        decode = [Upstream.parse(url) for url in args.decode]
    except ValueError as exc:
        raise ConfigError("--prefill/--decode", str(exc)) from None
    if args.max_concurrency < 1:
        raise ConfigError("--max-concurrency", "must be at least 1")
    settings = ProxySettings(timeout_s=args.timeout, max_concurrency=args.max_concurrency,
                             max_waiting=4 * args.max_concurrency)
    router = None
    if args.events:
        from kvtier.proxy.cacheaware import CacheAwareRouter

        if len(args.events) != len(decode):
            raise ConfigError("--events", f"give one per --instance/--decode ({len(decode)}), got {len(args.events)}")
        router = CacheAwareRouter(decode, args.events)
    try:
        server = serve(Proxy(prefill, decode, settings=settings, router=router), args.host, args.port)
    except OSError as exc:
        raise ConfigError("--port", f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    print(f"kvtier proxy on http://{args.host}:{server.server_address[1]} "
          f"(prefill: {', '.join(args.prefill) or 'none'}; decode: {', '.join(args.decode)})", flush=True)
    try:
        threading.Event().wait()  # until Ctrl-C or SIGTERM (main() turns both into KeyboardInterrupt)
    except KeyboardInterrupt:
        server.shutdown()
    return 0


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def cmd_config_check(args: argparse.Namespace) -> int:
    from kvtier.bench.summary import format_table
    from kvtier.config import describe, load_config

    loaded = load_config({"config": args.file}, os.environ)
    print(format_table(["key", "value", "source"], [list(row) for row in describe(loaded)], num_left_columns=3))
    for warning in loaded.warnings:
        print(f"warning: {warning}")
    from kvtier.preflight import check_block_size, check_files, check_remote

    findings = check_files(loaded, os.environ)
    if args.block_size is not None:
        findings += check_block_size(loaded, args.block_size)
    if args.connect:
        findings += check_remote(loaded, os.environ)
    for finding in findings:
        print(f"error: {finding}", file=sys.stderr)
    if findings:
        raise CommandError(f"{args.file}: {len(findings)} problem(s), each naming its key above",
                           "fix the keys named above; docs/configuration.md describes them")
    print(f"\n{args.file}: ok")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from kvtier.bench.client import fetch_text
    from kvtier.bench.scrape import NO_TIER, by_tier, parse_samples
    from kvtier.bench.summary import format_bytes, format_table

    table = by_tier(parse_samples(fetch_text(args.url, timeout_s=10)))
    if not table:
        raise CommandError(f"{args.url} serves no kvtier_* metrics",
                           "is this the metrics port of an engine running kvtier (config key metrics.port)?")
    tiers = sorted({tier for row in table.values() for tier in row}, key=lambda t: (t == NO_TIER, t))

    def cell(name: str, number: float | None) -> str:
        if number is None:
            return ""
        return format_bytes(number) if "bytes" in name else f"{number:,.6g}"

    rows = [[name.removeprefix("kvtier_"), *(cell(name, row.get(tier)) for tier in tiers)]
            for name, row in sorted(table.items())]
    print(format_table(["metric", *tiers], rows))
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    import json

    from kvtier.admin.client import AdminRefused, admin_request

    token = _admin_token(args)
    command = args.admin_command
    method, path, body = "GET", f"/v1/{command}", None
    if command in ("lookup", "invalidate"):
        method, path = "POST", f"/v1/{command}"
        body = {"namespace": args.namespace}
        if args.salt is not None:
            body["salt"] = args.salt
        if args.token_ids:
            body["token_ids"] = _read_token_ids(args.token_ids)
        elif command == "invalidate" and args.keys:
            body["keys"] = args.keys
    elif command == "limits":
        method, path = "PUT", f"/v1/namespaces/{args.namespace}"
        body = {name: value for name, value in (("ttl_s", args.ttl), ("memory_quota", args.memory_quota),
                                                ("disk_quota", args.disk_quota)) if value is not None}
        if not body:
            raise CommandError("nothing to set", "pass --ttl, --memory-quota and/or --disk-quota")
    try:
        answer = admin_request(args.url, token, method, path, body)
    except AdminRefused as exc:
        hint = {401: "the token is missing or unknown to the engine (admin.tokens_file)",
                403: "this action needs an admin token; the one given is read-only"}.get(exc.status, "see the message")
        raise CommandError(str(exc), hint) from None
    print(json.dumps(answer, indent=2, sort_keys=True))
    return 0


def _admin_token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                token = file.read().strip()
        except OSError as exc:
            raise CommandError(f"cannot read --token-file {args.token_file}: {exc.strerror or exc}",
                               "pass a file holding the token alone") from None
    else:
        token = os.environ.get(args.token_env, "").strip()
    if not token:
        raise CommandError("the bearer token is empty", "--token-file or --token-env must hold a token")
    return token


def _read_token_ids(path: str) -> list[int]:
    import json

    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read token ids from {path}: {exc}", "the file must hold a JSON list of "
                                                                        "integers") from None
    if not isinstance(value, list) or not all(type(item) is int for item in value):
        raise CommandError(f"{path} does not hold a JSON list of integers", "e.g. [1, 2, 3]")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from kvtier.demo import DOCUMENT_TOKENS, DemoOptions, max_rounds, run_demo, say

    num_users = args.users or (3 if args.quick else 4)
    num_rounds = args.rounds or (2 if args.quick else 3)
    if num_rounds > max_rounds(DOCUMENT_TOKENS):
        raise CommandError(f"--rounds {num_rounds} would not fit the 4,096-token context",
                           f"use --rounds {max_rounds(DOCUMENT_TOKENS)} or fewer")
    options = DemoOptions(models_dir=args.models_dir, out_dir=args.out_dir, num_users=num_users,
                          num_rounds=num_rounds, tiny=args.tiny, port=args.port,
                          startup_timeout_s=float(args.startup_timeout))
    run_demo(options, say)
    return 0


def cmd_bench(args: argparse.Namespace, engine_extra_args: list[str]) -> int:
    from kvtier.bench.main import run_bench, say
    from kvtier.bench.options import bench_options
    from kvtier.models import SMOLLM2_MODEL, TINY_MODEL, make_tiny_model, prepare_smollm2
    from kvtier.serve import connector_config_json

    options = bench_options(args, engine_extra_args)
    engine_model = ""
    if args.model:
        from kvtier.bench.hub import resolve_model

        source = resolve_model(args.model)
        model_dir, engine_model = source.files_dir, source.engine_model
    elif args.tiny:
        model_dir = make_tiny_model(os.path.join(args.models_dir, TINY_MODEL), say)
    else:
        model_dir = prepare_smollm2(os.path.join(args.models_dir, SMOLLM2_MODEL), say)
    run_bench(options, model_dir, lambda keys: connector_config_json(None, keys), say, engine_model)
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from kvtier.advisor.command import run_advise

    run_advise(args)
    return 0


def _hint(args: argparse.Namespace, exc: KVTierError) -> str:
    if isinstance(exc, ConfigError) and args.command == "bench":
        return "`kvtier bench WORKLOAD --help` lists the flags and their defaults"
    if isinstance(exc, ConfigError) and args.command == "advise":
        return "`kvtier advise --help` lists the flags and the trace formats"
    if isinstance(exc, ConfigError):
        return "`kvtier config check FILE` shows every key; docs/configuration.md describes them"
    if isinstance(exc, ModelError):
        return "remove the folder named above, or pass another --models-dir"
    if args.command == "stats":
        return "is an engine running kvtier with metrics.port set? pass its address with --url"
    if args.command == "admin":
        return "is an engine running kvtier with admin.port set? pass its address with --url"
    if args.command == "demo":
        return (f"server logs are in {os.path.join(args.out_dir, 'logs')}; if a port is taken, pass another "
                "--port or leave it out")
    if args.command == "bench":
        return (f"the report and server logs are in {args.out_dir or os.path.join('out', 'bench', args.workload)}; "
                "a failed configuration's log is named after it")
    return "see the message above"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bench_engine_args: list[str] = []
    if args.command == "bench" and extra[:1] == ["--"]:  # vLLM arguments passed through
        bench_engine_args, extra = extra[1:], []
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "config": cmd_config_check, "stats": cmd_stats, "admin": cmd_admin, "demo": cmd_demo,
        "bench": lambda a: cmd_bench(a, bench_engine_args),
        "advise": cmd_advise,
        "serve": lambda a: cmd_serve(a, extra), "proxy": cmd_proxy, "token": cmd_token,
    }
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so servers we started are stopped
    try:
        return handlers[args.command](args)
    except CommandError as exc:
        return _fail(str(exc), exc.hint, 2)
    except (ConfigError, ModelError) as exc:
        return _fail(str(exc), _hint(args, exc), 2)
    except KVTierError as exc:  # ServerError and any other runtime failure
        return _fail(str(exc), _hint(args, exc), 1)
    except KeyboardInterrupt:
        print("kvtier: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kvtier stats | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _fail(message: str, hint: str, code: int) -> int:
    print(f"kvtier: error: {message}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
