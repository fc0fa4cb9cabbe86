"""What `lmforge serve` can be told: every setting declared once, in `ServeSettings`, with its attribute docstring.

The dataclass is the interface: `create_app` takes one (tests build the same app in-process), and `serve_command`
takes one, so lmforge.cli makes each field a flag (its help the docstring) and reads `--config FILE.yaml`; a
setting is added by adding a field.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.errors import LmforgeError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class ServeSettingsError(LmforgeError):
    """A serve setting out of range or a file it names that cannot be read; `param` names the setting."""


@dataclass
class ServeSettings:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) and a web chat."""

    model: str
    """model folder (lmforge run or imported Hugging Face folder) or a llama2.c .bin file."""
    host: str = "127.0.0.1"
    """address to listen on; 127.0.0.1 keeps it on this machine, 0.0.0.0 opens it to the network."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """require this key as 'Authorization: Bearer KEY' on /v1 and /tokenize routes."""
    api_key_file: str | None = None
    """file with one accepted API key per line (combined with --api-key)."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Host header names accepted besides the loopback names (localhost, 127.0.0.1, ::1), which are all a server
    bound to loopback accepts by default (a web page elsewhere cannot drive it through DNS rebinding); '*'
    accepts any. A server bound to another address accepts any Host unless this is given."""
    max_batch: int = 16
    """sequences decoded together in one batch."""
    max_queue: int = 64
    """sequences allowed to wait beyond the running batch (a request holds len(prompts) x n of them); more get
    429 with Retry-After, and a request larger than max_batch + max_queue gets 400."""
    max_model_len: int | None = None
    """prompt plus output tokens per request at most (default: the model's context)."""
    max_num_batched_tokens: int = 256
    """tokens computed per engine step at most (prompts longer than what is left are prefilled in chunks)."""
    quantize: Literal["none", "int8", "int4"] = "none"
    """int8 (a scale per row) or int4 (GGUF Q4_0's 32-blocks) quantizes the linear layers' weights at load time (less
    memory, faster decoding on CPU)."""
    draft: str | None = None
    """a smaller model sharing the tokenizer: speculative decoding of every running request (the output keeps
    the model's distribution; greedy output is unchanged)."""
    speculative: Literal["ngram"] | None = None
    """ngram: speculative decoding by prompt lookup, no draft model: the tokens that followed the last few tokens
    earlier in the prompt or output are proposed and checked in one forward (fast where answers repeat their
    input: editing code, extracting fields; greedy output is unchanged, sampled output keeps the distribution)."""
    num_speculative_tokens: int = 4
    """tokens the draft (or prompt lookup, at most) proposes per request and step."""
    tokenizer: str | None = None
    """tokenizer.json or folder to use instead of the model folder's own."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """weights dtype; bfloat16 halves the weights' memory and, on CPUs with AVX-512 BF16 or AMX, decodes many
    requests at once about twice as fast (bench/engine.py)."""
    kv_dtype: Literal["auto", "float16"] = "auto"
    """the KV cache's dtype: auto is the model's; float16 under a float32 model halves the bytes per token (twice
    the context in the same memory, faster attention at many requests) and rounds keys and values to 11
    significant bits."""
    engine: Literal["process", "thread"] = "process"
    """where the engine runs: in its own process (the HTTP layer and the engine's step never wait on one Python
    lock; the model is loaded there) or on a thread of the server's process."""
    served_model_name: str | None = None
    """the model id clients send (default: the model folder's name)."""
    chat_template: str | None = None
    """a Jinja chat template file to use instead of the model's own (tokenizer_config.json) or the default."""
    rate_limit_tpm: int = 0
    """tokens (prompt + generated) per minute per API key; 0 means unlimited. A request reserves its prompt
    plus max_tokens x n x prompts when admitted and is refunded what it did not use when it ends."""
    max_body_bytes: int = 1_000_000
    """largest request body accepted."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn's log level."""
    adapter: str | None = None
    """a LoRA adapter folder merged into the model on load (its saved chat template is used)."""
    lora: dict[str, str] = field(default_factory=dict)
    """LoRA adapters served beside the unmerged model, NAME=PATH each (PEFT's format or lmforge's): a request
    picks one by sending its NAME as `model`; requests for different adapters and for the base share every
    decoding step. More are loaded and unloaded at run time through POST /v1/load_lora_adapter and
    /v1/unload_lora_adapter (which need --api-key)."""
    embedding_pooling: Literal["mean", "last"] = "mean"
    """how /v1/embeddings pools the final hidden states over an input's tokens: mean (every token; the better
    choice for models trained only to predict the next token) or last (the last token's state, for models
    fine-tuned as embedders)."""
    classifier: str | None = None
    """a classifier folder (`lmforge classify train`) served at POST /v1/classify (default: MODEL itself when
    it is one)."""
    controls: str | None = None
    """banned phrases and word logit biases applied to every request (JSON or text file, see
    lmforge.infer.controls); responses carry the fire counts in an extra `lmforge` field, /metrics in
    lmforge_control_fired_total."""

    def __post_init__(self) -> None:
        for name, low in (
            ("max_batch", 1),
            ("max_queue", 0),
            ("port", 0),
            ("num_speculative_tokens", 1),
            ("max_num_batched_tokens", 1),
            ("rate_limit_tpm", 0),
            ("max_body_bytes", 1),
        ):
            if getattr(self, name) < low:
                raise ServeSettingsError(f"{{param}}={getattr(self, name)} is out of range: it must be >= {low}", name)
        if self.speculative is not None and self.draft is not None:
            raise ServeSettingsError("{param} ngram and --draft are two ways to draft: give one", "speculative")
        if self.model_name in self.lora:
            raise ServeSettingsError(
                f"{{param}}: an adapter may not be named {self.model_name!r}, the served model's own name", "lora"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ServeSettingsError(f"{{param}}={self.max_model_len} is too small; it must be >= 2", "max_model_len")

    @property
    def model_name(self) -> str:
        """The model id clients send: --served-model-name, else the model folder's name."""
        return self.served_model_name or Path(self.model).stem or "lmforge"

    def api_keys(self) -> list[str]:
        """--api-key plus the keys in --api-key-file (empty: no authentication)."""
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file:
            path = Path(self.api_key_file)
            if not path.is_file():
                raise ServeSettingsError(f"{{param}} {path} does not exist", "api_key_file")
            keys += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not keys:
                raise ServeSettingsError(f"{{param}} {path} holds no keys (one per line expected)", "api_key_file")
        return keys

    def host_names(self) -> frozenset[str] | None:
        """Host header names accepted (lower case, no port), or None for any."""
        extra = {h.strip().lower().strip("[]") for h in self.allowed_hosts if h.strip()}
        if "*" in extra:
            return None
        if not _is_loopback(self.host) and not extra:
            return None
        return frozenset(LOOPBACK_NAMES) | extra


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
