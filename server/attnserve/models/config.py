"""Server configuration: which models to serve, their limits and presets (YAML or TOML).

Parsing is strict: an unknown key, a wrong type or a bad value raises ConfigError naming the
file and the key path (`models[0].limits.max_tokens`). Preset interventions stay plain dicts;
spec/ compiles them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from attnserve.api.tokens import TokenError, TokenStore
from attnserve.engines.registry import ENGINES, engines_serving
from attnserve.models.builtin import BUILTINS, default_cache_dir, ensure_builtin

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

MODEL_KINDS = ("llm", "vlm", "diffusion")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A server config (or a preset file it names) that cannot be used."""


@dataclass(frozen=True)
class Limits:
    """Per-request and scheduling limits; server-wide defaults, overridable per model."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_interventions: int = 16
    max_readout_values: int = 262144
    max_logprobs: int = 20
    #: Images one request may carry (vision-language models).
    max_images: int = 4
    #: Encoded bytes of one image.
    max_image_bytes: int = 8 * 1024 * 1024
    #: Width x height of one image, checked before decoding.
    max_image_pixels: int = 4096 * 4096
    #: Rows decoded together in one batch.
    max_batch_size: int = 16
    max_waiting_requests: int = 256
    #: GenerateImage: pixels per side, denoising steps and images generated per request.
    max_image_size: int = 1024
    max_denoising_steps: int = 200
    max_generated_images: int = 4


@dataclass(frozen=True)
class StatisticsConfig:
    #: Share of steps whose attention statistics feed the metrics.
    sample_rate: float = 0.05


@dataclass(frozen=True)
class VllmSettings:
    """vLLM engine settings (models[].vllm); the engine passes them to vLLM's engine args."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    #: None: the model's own maximum context length.
    max_model_len: int | None = None
    #: KV cache size on the CPU, in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).
    kv_cache_gib: float = 4.0
    #: Share of GPU memory vLLM may take for weights, activations and the KV cache.
    gpu_memory_utilization: float = 0.9
    #: Eager mode starts in seconds instead of minutes; compiled mode is faster per token.
    enforce_eager: bool = False


@dataclass(frozen=True)
class Preset:
    """A named intervention list requests can use by name."""

    name: str
    description: str
    #: Plain intervention dicts in the client's spec-file format.
    interventions: tuple[Mapping[str, Any], ...]
    provenance: Mapping[str, str]
    #: The file the interventions came from; None when inline.
    file: Path | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: str
    engine: str
    #: Exactly one of builtin and path is set.
    builtin: str | None
    path: Path | None
    dtype: str
    #: torch device the engine runs on: "cpu", "cuda", "cuda:1", ...
    device: str
    #: Effective limits: this model's overrides on top of the server-wide limits.
    limits: Limits
    #: By name, in config order.
    presets: Mapping[str, Preset]
    vllm: VllmSettings = VllmSettings()

    def resolve_path(self, cache_dir: Path) -> Path:
        """The model's local directory; converts a built-in into cache_dir on first use."""
        if self.builtin is not None:
            return ensure_builtin(self.builtin, cache_dir)
        assert self.path is not None
        if not self.path.is_dir():
            raise ConfigError(f"model {self.name!r}: path {self.path} is not a directory")
        return self.path


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    #: Clients must present a certificate this CA signed (mTLS); None: no client certificates.
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class SecurityConfig:
    #: None serves plaintext (behind a mesh or proxy that terminates TLS, or on loopback).
    tls: TlsConfig | None = None
    #: None: no token needed.
    tokens: TokenStore | None = None


@dataclass(frozen=True)
class ServerConfig:
    cache_dir: Path
    limits: Limits
    statistics: StatisticsConfig
    #: By name, in config order.
    models: Mapping[str, ModelConfig]
    source: Path
    security: SecurityConfig = SecurityConfig()


def load_config(path: Path | None = None) -> ServerConfig:
    """Load a server config file (.yaml, .yml or .toml); None loads the packaged default."""
    source = Path(path).expanduser().resolve() if path is not None else DEFAULT_CONFIG_PATH
    data = _read_config_file(source)
    try:
        return _parse_server(data, source)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


# --- Files ------------------------------------------------------------------------------------


def _read_config_file(source: Path) -> Any:
    suffix = source.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"{source}: unsupported config format {suffix!r} (use .yaml, .yml or .toml)")
    try:
        if suffix == ".toml":
            with open(source, "rb") as f:
                return tomllib.load(f)
        return yaml.safe_load(source.read_text())
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{source}: {err}") from None


def _read_preset_file(path: Path) -> Any:
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read it: {err}") from None


# --- Sections ---------------------------------------------------------------------------------


def _parse_server(data: Any, source: Path) -> ServerConfig:
    data = _mapping({} if data is None else data, "config")
    _reject_unknown(data, ("cache_dir", "limits", "statistics", "models", "security"), "")
    base_dir = source.parent

    cache_dir = (
        _path(data["cache_dir"], "cache_dir", base_dir) if "cache_dir" in data else default_cache_dir()
    )
    limits = _parse_limits(data.get("limits", {}), Limits(), "limits")
    statistics = _parse_statistics(data.get("statistics", {}), "statistics")

    model_items = _list(data.get("models", []), "models")
    if not model_items:
        raise ConfigError("models: at least one model is required")
    models: dict[str, ModelConfig] = {}
    for i, item in enumerate(model_items):
        model = _parse_model(item, limits, base_dir, f"models[{i}]")
        if model.name in models:
            raise ConfigError(f"models[{i}].name: duplicate model name {model.name!r}")
        models[model.name] = model
    return ServerConfig(
        cache_dir=cache_dir,
        limits=limits,
        statistics=statistics,
        models=MappingProxyType(models),
        source=source,
        security=_parse_security(data.get("security", {}), base_dir, "security"),
    )


def _parse_security(data: Any, base_dir: Path, where: str) -> SecurityConfig:
    data = _mapping(data, where)
    _reject_unknown(data, ("tls", "tokens_file", "tokens_env"), where)
    tls = _parse_tls(data["tls"], base_dir, _join(where, "tls")) if "tls" in data else None
    stores = []
    try:
        if "tokens_file" in data:
            path = _existing_file(data["tokens_file"], _join(where, "tokens_file"), base_dir)
            stores.append(TokenStore.parse(path.read_text(), f"{_join(where, 'tokens_file')} ({path})"))
        if "tokens_env" in data:
            name = _str(data["tokens_env"], _join(where, "tokens_env"))
            text = os.environ.get(name)
            if text is None:
                raise ConfigError(f"{_join(where, 'tokens_env')}: environment variable {name} is not set")
            stores.append(
                TokenStore.parse(text.replace(";", "\n"), f"{_join(where, 'tokens_env')} (${name})")
            )
    except TokenError as err:
        raise ConfigError(str(err)) from None
    tokens = stores[0].merged(stores[1]) if len(stores) == 2 else (stores[0] if stores else None)
    return SecurityConfig(tls=tls, tokens=tokens)


def _parse_tls(data: Any, base_dir: Path, where: str) -> TlsConfig:
    data = _mapping(data, where)
    _reject_unknown(data, ("cert_file", "key_file", "client_ca_file"), where)
    for key in ("cert_file", "key_file"):
        if key not in data:
            raise ConfigError(f"{where}: missing key {key!r}")
    ca = data.get("client_ca_file")
    return TlsConfig(
        cert_file=_existing_file(data["cert_file"], _join(where, "cert_file"), base_dir),
        key_file=_existing_file(data["key_file"], _join(where, "key_file"), base_dir),
        client_ca_file=_existing_file(ca, _join(where, "client_ca_file"), base_dir)
        if ca is not None
        else None,
    )


def _existing_file(value: Any, where: str, base_dir: Path) -> Path:
    path = _path(value, where, base_dir)
    if not path.is_file():
        raise ConfigError(f"{where}: no such file: {path}")
    return path


def _parse_limits(data: Any, defaults: Limits, where: str) -> Limits:
    data = _mapping(data, where)
    names = tuple(f.name for f in dataclasses.fields(Limits))
    _reject_unknown(data, names, where)
    overrides = {name: _positive_int(value, _join(where, name)) for name, value in data.items()}
    return dataclasses.replace(defaults, **overrides)


def _parse_statistics(data: Any, where: str) -> StatisticsConfig:
    data = _mapping(data, where)
    _reject_unknown(data, ("sample_rate",), where)
    if "sample_rate" not in data:
        return StatisticsConfig()
    key = _join(where, "sample_rate")
    rate = data["sample_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{key}: expected a number in [0, 1], got {rate!r}")
    return StatisticsConfig(sample_rate=float(rate))


def _parse_model(data: Any, server_limits: Limits, base_dir: Path, where: str) -> ModelConfig:
    data = _mapping(data, where)
    keys = ("name", "kind", "engine", "builtin", "path", "dtype", "device", "limits", "presets", "vllm")
    _reject_unknown(data, keys, where)
    name = _required_str(data, "name", where)
    kind = _choice(data, "kind", MODEL_KINDS, where)
    engines = engines_serving(kind)
    if not engines:
        served = "; ".join(f"{name} serves {', '.join(e.model_kinds)}" for name, e in ENGINES.items())
        raise ConfigError(
            f"{_join(where, 'kind')}: no engine in this build serves {kind!r} models ({served})"
        )
    engine = _choice(data, "engine", engines, where, f" for kind {kind!r}")
    dtype = _choice(data, "dtype", DTYPES, where, default="float32")

    if ("builtin" in data) == ("path" in data):
        raise ConfigError(f"{where}: set exactly one of builtin and path")
    builtin: str | None = None
    path: Path | None = None
    if "builtin" in data:
        builtin = _choice(data, "builtin", tuple(BUILTINS), where)
        if BUILTINS[builtin].kind != kind:
            raise ConfigError(
                f"{_join(where, 'builtin')}: {builtin!r} is a {BUILTINS[builtin].kind} model, not {kind}"
            )
    else:
        path = _path(data["path"], _join(where, "path"), base_dir)

    presets: dict[str, Preset] = {}
    for i, item in enumerate(_list(data.get("presets", []), _join(where, "presets"))):
        preset = _parse_preset(item, base_dir, f"{where}.presets[{i}]")
        if preset.name in presets:
            raise ConfigError(f"{where}.presets[{i}].name: duplicate preset name {preset.name!r}")
        presets[preset.name] = preset

    return ModelConfig(
        name=name,
        kind=kind,
        engine=engine,
        builtin=builtin,
        path=path,
        dtype=dtype,
        device=_str(data.get("device", "cpu"), _join(where, "device")),
        limits=_parse_limits(data.get("limits", {}), server_limits, _join(where, "limits")),
        presets=MappingProxyType(presets),
        vllm=_parse_vllm(data["vllm"], engine, _join(where, "vllm")) if "vllm" in data else VllmSettings(),
    )


def _parse_vllm(data: Any, engine: str, where: str) -> VllmSettings:
    if engine != "vllm":
        raise ConfigError(f"{where}: vLLM settings need engine: vllm (this model uses {engine!r})")
    data = _mapping(data, where)
    _reject_unknown(data, tuple(f.name for f in dataclasses.fields(VllmSettings)), where)
    settings = {}
    for key, value in data.items():
        at = _join(where, key)
        if key == "enforce_eager":
            if not isinstance(value, bool):
                raise ConfigError(f"{at}: expected true or false, got {value!r}")
            settings[key] = value
        elif key == "kv_cache_gib":
            settings[key] = _positive_number(value, at)
        elif key == "gpu_memory_utilization":
            settings[key] = _positive_number(value, at)
            if settings[key] > 1:
                raise ConfigError(f"{at}: expected a share in (0, 1], got {value!r}")
        else:
            settings[key] = _positive_int(value, at)
    return VllmSettings(**settings)


def _parse_preset(data: Any, base_dir: Path, where: str) -> Preset:
    data = _mapping(data, where)
    _reject_unknown(data, ("name", "description", "file", "interventions", "provenance"), where)
    name = _required_str(data, "name", where)
    if ("file" in data) == ("interventions" in data):
        raise ConfigError(f"{where}: set exactly one of file and interventions")

    description = ""
    provenance: dict[str, str] = {}
    file: Path | None = None
    if "file" in data:
        file = _path(data["file"], _join(where, "file"), base_dir)
        file_where = f"{_join(where, 'file')} ({file})"
        try:
            interventions, description, provenance = _parse_preset_file(_read_preset_file(file))
        except ConfigError as err:
            raise ConfigError(f"{file_where}: {err}") from None
    else:
        interventions = _interventions(data["interventions"], _join(where, "interventions"))

    # The config entry's description and provenance win over the file's.
    description = _str(data.get("description", description), _join(where, "description"))
    provenance |= _provenance(data.get("provenance", {}), _join(where, "provenance"))
    return Preset(
        name=name,
        description=description,
        interventions=interventions,
        provenance=MappingProxyType(provenance),
        file=file,
    )


def _parse_preset_file(content: Any) -> tuple[tuple[Mapping[str, Any], ...], str, dict[str, str]]:
    """A preset file holds a list of interventions, or a mapping with `interventions` and
    optional `description` and `provenance`."""
    if isinstance(content, list):
        return _interventions(content, "interventions"), "", {}
    if not isinstance(content, Mapping):
        raise ConfigError(
            f"expected a list of interventions or a mapping with 'interventions', got {type(content).__name__}"
        )
    _reject_unknown(content, ("interventions", "description", "provenance"), "")
    if "interventions" not in content:
        raise ConfigError("missing key 'interventions'")
    return (
        _interventions(content["interventions"], "interventions"),
        _str(content.get("description", ""), "description"),
        _provenance(content.get("provenance", {}), "provenance"),
    )


def _interventions(data: Any, where: str) -> tuple[Mapping[str, Any], ...]:
    items = _list(data, where)
    if not items:
        raise ConfigError(f"{where}: a preset needs at least one intervention")
    return tuple(_mapping(item, f"{where}[{i}]") for i, item in enumerate(items))


def _provenance(data: Any, where: str) -> dict[str, str]:
    data = _mapping(data, where)
    provenance = {}
    for key, value in data.items():
        # YAML turns dates and numbers into non-strings; provenance is text.
        if isinstance(value, (Mapping, list)) or value is None:
            raise ConfigError(f"{_join(where, str(key))}: expected a string, got {value!r}")
        provenance[str(key)] = str(value)
    return provenance


# --- Values -----------------------------------------------------------------------------------


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _reject_unknown(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{_join(where, str(key))}: unknown key (allowed: {', '.join(allowed)})")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _required_str(data: Mapping[str, Any], key: str, where: str) -> str:
    if key not in data:
        raise ConfigError(f"{where}: missing key {key!r}")
    value = _str(data[key], _join(where, key))
    if not value.strip():
        raise ConfigError(f"{_join(where, key)}: must not be empty")
    return value


def _choice(
    data: Mapping[str, Any],
    key: str,
    choices: tuple[str, ...],
    where: str,
    context: str = "",
    default: str | None = None,
) -> str:
    if key not in data and default is not None:
        return default
    value = _required_str(data, key, where)
    if value not in choices:
        raise ConfigError(f"{_join(where, key)}: {value!r} is not one of {', '.join(choices)}{context}")
    return value


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _positive_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def _path(value: Any, where: str, base_dir: Path) -> Path:
    """A path from the config: `~` expanded, relative paths taken from the config's folder."""
    return (base_dir / Path(_str(value, where)).expanduser()).resolve()
