"""Engine configuration: one dataclass shared by `loom.Engine`, `loom serve` and the scheduler."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, fields

from loom.runtime.grammar_limits import LIMIT_NAMES, GrammarLimits

# Grammar backend -> the module it needs (checked when ServerArgs is built, before any process starts).
# loom: Loom's own compilers (byte DFAs for regexes and JSON Schemas, outlines-core turning a schema
# into a regex; LALR masks for EBNF / Lark); xgrammar and llguidance: theirs.
GRAMMAR_BACKENDS = {"loom": "outlines_core", "xgrammar": "xgrammar", "llguidance": "llguidance"}
GRAMMAR_BACKEND_ALIASES = {"outlines": "loom"}  # the loom backend's former name


class EngineArgumentError(TypeError, ValueError):
    """A wrong engine argument, named in the message: an unknown keyword (a TypeError, as Python
    raises for one) or a value out of range (a ValueError). One type for one mistake, whichever
    entry point it comes through: `loom.Engine`, `LocalEngine`, `loom.Runtime` (checked in this
    process before the server starts) or `loom serve`."""


def grammar_backend_name(name: str) -> str:
    """The canonical name of a grammar backend (an alias resolved). Raises EngineArgumentError
    naming the accepted names for any other."""
    canonical = GRAMMAR_BACKEND_ALIASES.get(name, name)
    if canonical not in GRAMMAR_BACKENDS:
        aliases = ", ".join(f"{alias} is an alias of {target}" for alias, target in GRAMMAR_BACKEND_ALIASES.items())
        raise EngineArgumentError(f"grammar_backend must be one of {', '.join(GRAMMAR_BACKENDS)} ({aliases}), got {name!r}")
    return canonical


_GRAMMAR_LIMITS = GrammarLimits()


@dataclass(slots=True)
class ServerArgs:
    model_path: str
    tokenizer_path: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 ("auto": on CPU bf16 with AVX512_BF16/AMX, else fp32; the checkpoint's dtype on GPU)
    device: str = "auto"  # auto | cpu | cuda
    context_length: int | None = None  # default: the model's max_position_embeddings
    max_total_tokens: int | None = None  # KV slots; default: mem_fraction_static of free memory
    mem_fraction_static: float = 0.25  # share of (free) memory given to the KV pool when max_total_tokens is None
    chunked_prefill_size: int = 2048  # max new tokens per prefill step; <= 0 disables chunking
    max_prefill_tokens: int = 16384  # max new tokens in one prefill batch
    max_running_requests: int = 128
    schedule_policy: str = "lpm"  # lpm | fcfs
    disable_radix_cache: bool = False
    attention_backend: str = "auto"
    random_seed: int | None = None
    enable_in_batch_prefix_sharing: bool = True
    debug_check_memory: bool = False  # assert the KV-pool invariant after every scheduler step
    disable_jump_forward: bool = False  # decode grammar-forced strings one token per step (see runtime/constrained/jump_forward.py)
    # Overlap scheduling (runtime/scheduler/overlap.py): prepare decode step N+1 while step N runs. None: the
    # device decides (on with CUDA; on CPU see scheduler.CPU_OVERLAP_DEFAULT); False forces it on.
    disable_overlap_schedule: bool | None = None
    grammar_backend: str = "loom"  # loom (alias: outlines) | xgrammar | llguidance (the last two: pip install loom[grammar])
    kv_cache_dtype: str = "auto"  # auto (= dtype) | fp8_e4m3 (half the KV memory of bf16, per-layer scales)
    # Weight-only quantized linear layers (runtime/layers/quantized.py): auto (a GGUF's own Q8_0/Q4_0/Q4_1, other
    # quantized types as Q8_0, GPTQ/AWQ as Q4_1; float checkpoints stay float) | none | int8 | int4 (quantized at load).
    quantization: str = "auto"
    base_gpu_id: int = 0  # the first GPU this server uses; ranks and data-parallel replicas take the next ones
    dp_size: int = 1  # data-parallel replicas behind one front (loom serve only)
    dp_routing: str = "cache_aware"  # cache_aware | round_robin
    tp_size: int = 1  # tensor-parallel ranks (all nodes together), one scheduler process each
    nnodes: int = 1  # machines the tp ranks span (tp_size / nnodes ranks on each)
    node_rank: int = 0  # this machine's index; node 0 serves HTTP, the others run only their ranks
    dist_init_addr: str | None = None  # host:port of the torch.distributed rendezvous (default: a free local port)
    disable_cpu_weight_packing: bool = False  # CPU weights as loaded: no oneDNN copy (layers/linear.py), no panels (layers/quantized.py)
    disable_cuda_graph: bool = False  # decode eagerly (graphs apply on CUDA with the triton / flashinfer backends)
    cuda_graph_max_bs: int | None = None  # largest decode batch run as a CUDA graph (None: min(160, max_running_requests))
    # How large a grammar a request may send, and how long its compile may take (runtime/grammar_limits.py).
    grammar_max_source_chars: int = _GRAMMAR_LIMITS.max_source_chars
    grammar_max_string_length: int = _GRAMMAR_LIMITS.max_string_length
    grammar_max_items: int = _GRAMMAR_LIMITS.max_items
    grammar_max_repeat: int = _GRAMMAR_LIMITS.max_repeat
    grammar_max_regex_size: int = _GRAMMAR_LIMITS.max_regex_size
    grammar_max_nesting: int = _GRAMMAR_LIMITS.max_nesting
    grammar_compile_timeout_s: float = _GRAMMAR_LIMITS.compile_timeout_s

    def grammar_limits(self) -> GrammarLimits:
        """The `grammar_*` arguments as the grammar backend's limits."""
        try:
            return GrammarLimits(**{name: getattr(self, f"grammar_{name}") for name in LIMIT_NAMES})
        except ValueError as exc:
            raise EngineArgumentError(str(exc)) from None

    def __post_init__(self) -> None:
        if os.environ.get("LOOM_DEBUG_MEMORY") == "1":
            self.debug_check_memory = True
        if self.disable_overlap_schedule is None and os.environ.get("LOOM_DISABLE_OVERLAP_SCHEDULE") in ("0", "1"):
            self.disable_overlap_schedule = os.environ["LOOM_DISABLE_OVERLAP_SCHEDULE"] == "1"  # run test suites both ways
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise EngineArgumentError(f"schedule_policy must be 'lpm' or 'fcfs', got {self.schedule_policy!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise EngineArgumentError(f"dtype must be one of auto, float32, bfloat16, float16, got {self.dtype!r}")
        for name in ("max_total_tokens", "context_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 8):
                raise EngineArgumentError(f"{name} must be an int >= 8 or None, got {value!r}")
        if not isinstance(self.max_running_requests, int) or self.max_running_requests < 1:
            raise EngineArgumentError(f"max_running_requests must be an int >= 1, got {self.max_running_requests!r}")
        if self.quantization not in ("auto", "none", "int8", "int4"):
            raise EngineArgumentError(f"quantization must be one of auto, none, int8, int4, got {self.quantization!r}")
        self.grammar_limits()  # EngineArgumentError naming a limit that is not > 0
        if self.kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise EngineArgumentError(f"kv_cache_dtype must be 'auto' or 'fp8_e4m3', got {self.kv_cache_dtype!r}")
        self.grammar_backend = grammar_backend_name(self.grammar_backend)
        if importlib.util.find_spec(GRAMMAR_BACKENDS[self.grammar_backend]) is None:
            raise EngineArgumentError(
                f"grammar_backend {self.grammar_backend!r} needs the {GRAMMAR_BACKENDS[self.grammar_backend]} package, which is not "
                "installed: pip install 'loom[grammar]' (or pick another grammar_backend)"
            )
        if not isinstance(self.base_gpu_id, int) or self.base_gpu_id < 0:
            raise EngineArgumentError(f"base_gpu_id must be an int >= 0, got {self.base_gpu_id!r}")
        if not isinstance(self.dp_size, int) or self.dp_size < 1:
            raise EngineArgumentError(f"dp_size must be an int >= 1, got {self.dp_size!r}")
        if self.dp_routing not in ("cache_aware", "round_robin"):
            raise EngineArgumentError(f"dp_routing must be 'cache_aware' or 'round_robin', got {self.dp_routing!r}")
        self._check_parallel()
        if self.disable_overlap_schedule not in (None, True, False):
            raise EngineArgumentError(f"disable_overlap_schedule must be True, False or None (auto), got {self.disable_overlap_schedule!r}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise EngineArgumentError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static!r}")
        graph_bs = self.cuda_graph_max_bs
        if graph_bs is not None and (not isinstance(graph_bs, int) or graph_bs < 1):
            raise EngineArgumentError(f"cuda_graph_max_bs must be an int >= 1 or None, got {self.cuda_graph_max_bs!r}")

    def _check_parallel(self) -> None:
        for name in ("tp_size", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EngineArgumentError(f"{name} must be an int >= 1, got {value!r}")
        if self.tp_size % self.nnodes:
            raise EngineArgumentError(f"tp_size={self.tp_size} must be a multiple of nnodes={self.nnodes} (the same ranks per node)")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise EngineArgumentError(f"node_rank must be an int in [0, nnodes={self.nnodes}), got {self.node_rank!r}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise EngineArgumentError("nnodes > 1 needs dist_init_addr=HOST:PORT, an address of node 0 that every node can reach")
        if self.nnodes > 1 and self.dp_size > 1:
            raise EngineArgumentError("dp_size > 1 with nnodes > 1 is not supported yet; run one server per node instead")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise EngineArgumentError(f"dist_init_addr must be HOST:PORT (e.g. 10.0.0.1:29500), got {self.dist_init_addr!r}")

    @property
    def tp_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def check_names(cls, kwargs: dict) -> None:
        """EngineArgumentError naming any keyword that is not an engine argument."""
        unknown = sorted(set(kwargs) - set(cls.field_names()) | ({"model_path"} & set(kwargs)))
        if unknown:
            expected = ", ".join(name for name in cls.field_names() if name != "model_path")
            raise EngineArgumentError(f"unknown engine argument(s) {unknown} (expected some of: {expected})")

    @classmethod
    def from_kwargs(cls, model_path: str | os.PathLike | None, **kwargs) -> ServerArgs:
        """The engine's arguments from keywords, every name and value checked (EngineArgumentError)."""
        if model_path is None:
            raise EngineArgumentError("the engine needs model_path: a .gguf file, or a folder (Hugging Face layout, or holding one .gguf)")
        cls.check_names(kwargs)
        return cls(model_path=str(model_path), **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)
