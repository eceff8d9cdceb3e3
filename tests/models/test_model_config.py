import json
import textwrap

import pytest
import yaml
from attnserve.models.config import DEFAULT_CONFIG_PATH, ConfigError, Limits, VllmSettings, load_config

FULL_YAML = """
cache_dir: cache
limits:
  max_tokens: 256
  max_batch_size: 8
statistics:
  sample_rate: 0.5
models:
  - name: smollm2
    kind: llm
    engine: transformers
    builtin: smollm2-135m-instruct
    limits: {max_tokens: 64, max_logprobs: 5}
    presets:
      - name: act
        description: inline preset
        interventions:
          - {layers: [3], sink_calibration: {tau: 0.1, beta: 0.4}}
        provenance: {calibrated_on: 2024-05-01, samples: 200}
  - name: local
    kind: llm
    engine: vllm
    path: weights/local
    dtype: bfloat16
"""

FULL_TOML = """
cache_dir = "cache"

[limits]
max_tokens = 256
max_batch_size = 8

[statistics]
sample_rate = 0.5

[[models]]
name = "smollm2"
kind = "llm"
engine = "transformers"
builtin = "smollm2-135m-instruct"
limits = { max_tokens = 64, max_logprobs = 5 }

[[models.presets]]
name = "act"
description = "inline preset"
interventions = [{ layers = [3], sink_calibration = { tau = 0.1, beta = 0.4 } }]
provenance = { calibrated_on = "2024-05-01", samples = "200" }

[[models]]
name = "local"
kind = "llm"
engine = "vllm"
path = "weights/local"
dtype = "bfloat16"
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def minimal_model(**extra):
    return {"name": "m", "kind": "llm", "engine": "transformers", "builtin": "smollm2-135m-instruct", **extra}


def config_error(tmp_path, data) -> str:
    path = write(tmp_path, "bad.yaml", json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


@pytest.mark.parametrize(("file_name", "text"), [("server.yaml", FULL_YAML), ("server.toml", FULL_TOML)])
def test_full_config(tmp_path, file_name, text):
    config = load_config(write(tmp_path, file_name, text))

    assert config.cache_dir == tmp_path / "cache"
    assert config.statistics.sample_rate == 0.5
    assert config.limits == Limits(max_tokens=256, max_batch_size=8)
    assert list(config.models) == ["smollm2", "local"]

    smollm2 = config.models["smollm2"]
    assert (smollm2.kind, smollm2.engine, smollm2.dtype) == ("llm", "transformers", "float32")
    assert (smollm2.builtin, smollm2.path) == ("smollm2-135m-instruct", None)
    # Model overrides on top of the server-wide limits, which sit on top of the defaults.
    assert smollm2.limits == Limits(max_tokens=64, max_logprobs=5, max_batch_size=8)
    act = smollm2.presets["act"]
    assert act.description == "inline preset"
    assert act.interventions == ({"layers": [3], "sink_calibration": {"tau": 0.1, "beta": 0.4}},)
    assert dict(act.provenance) == {"calibrated_on": "2024-05-01", "samples": "200"}
    assert act.file is None

    local = config.models["local"]
    assert (local.kind, local.engine, local.dtype) == ("llm", "vllm", "bfloat16")
    assert (local.builtin, local.path) == (None, tmp_path / "weights" / "local")
    assert local.limits == config.limits
    assert local.presets == {}


def test_defaults_and_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_CACHE_DIR", str(tmp_path / "env-cache"))
    config = load_config(write(tmp_path, "c.yml", json.dumps({"models": [minimal_model()]})))
    assert config.cache_dir == tmp_path / "env-cache"
    assert config.limits == Limits()
    assert config.statistics.sample_rate == 0.05
    assert config.models["m"].limits == Limits()


def test_packaged_default_config():
    config = load_config(None)
    assert config.source == DEFAULT_CONFIG_PATH
    model = config.models["smollm2"]
    assert (model.kind, model.engine, model.builtin, model.dtype) == (
        "llm",
        "vllm",
        "smollm2-135m-instruct",
        "float32",
    )
    assert model.vllm == VllmSettings(enforce_eager=True, kv_cache_gib=2.0)
    preset = model.presets["act-example"]
    assert "not calibrated" in preset.description
    assert all("sink_calibration" in iv for iv in preset.interventions)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": [minimal_model(engien="vllm")]}, "models[0].engien: unknown key"),
        ({"modles": []}, "modles: unknown key"),
        ({"models": [minimal_model(limits={"max_tokenz": 3})]}, "models[0].limits.max_tokenz: unknown key"),
        (
            {"limits": {"max_tokens": 0}, "models": [minimal_model()]},
            "limits.max_tokens: expected a positive",
        ),
        (
            {"limits": {"max_tokens": True}, "models": [minimal_model()]},
            "limits.max_tokens: expected a positive",
        ),
        ({"statistics": {"sample_rate": 2}, "models": [minimal_model()]}, "statistics.sample_rate: expected"),
        ({"models": []}, "models: at least one model"),
        ({"models": [minimal_model(), minimal_model()]}, "models[1].name: duplicate model name 'm'"),
        ({"models": [minimal_model(kind="audio")]}, "models[0].kind: 'audio' is not one of llm, vlm"),
        ({"models": [minimal_model(engine="diffusers")]}, "models[0].engine: 'diffusers' is not one of"),
        # Kinds no engine of this build serves fail when parsed, not when the model loads.
        (
            {"models": [minimal_model(kind="diffusion")]},
            (
                "models[0].kind: no engine in this build serves 'diffusion' models "
                "(transformers serves llm, vlm; vllm serves llm, vlm)"
            ),
        ),
        ({"models": [minimal_model(kind="diffusion", engine="diffusers")]}, "models[0].kind: no engine"),
        ({"models": [minimal_model(dtype="int8")]}, "models[0].dtype: 'int8' is not one of"),
        ({"models": [minimal_model(builtin="gpt-5")]}, "models[0].builtin: 'gpt-5' is not one of"),
        ({"models": [minimal_model(path="/models/x")]}, "models[0]: set exactly one of builtin and path"),
        ({"models": [{"name": "m", "kind": "llm", "engine": "vllm"}]}, "models[0]: set exactly one of"),
        ({"models": [{"kind": "llm"}]}, "models[0]: missing key 'name'"),
        (
            {"models": [minimal_model(presets=[{"name": "p"}])]},
            "models[0].presets[0]: set exactly one of file",
        ),
        (
            {"models": [minimal_model(presets=[{"name": "p", "interventions": [{}], "colour": 1}])]},
            "models[0].presets[0].colour: unknown key",
        ),
        (
            {"models": [minimal_model(presets=[{"name": "p", "interventions": []}])]},
            "models[0].presets[0].interventions: a preset needs at least one intervention",
        ),
        (
            {"models": [minimal_model(presets=[{"name": "p", "interventions": [3]}])]},
            "models[0].presets[0].interventions[0]: expected a mapping",
        ),
        (
            {
                "models": [
                    minimal_model(presets=[{"name": "p", "interventions": [{}], "provenance": {"a": [1]}}])
                ]
            },
            "models[0].presets[0].provenance.a: expected a string",
        ),
        (
            {"models": [minimal_model(presets=[{"name": "p", "interventions": [{}]}] * 2)]},
            "models[0].presets[1].name: duplicate preset name 'p'",
        ),
    ],
)
def test_errors_name_the_key(tmp_path, data, message):
    error = config_error(tmp_path, data)
    assert message in error
    assert str(tmp_path / "bad.yaml") in error


def test_a_vlm_on_the_transformers_engine(tmp_path):
    path = write(
        tmp_path, "vlm.yaml", json.dumps({"models": [minimal_model(kind="vlm", builtin="tiny-llava")]})
    )
    model = load_config(path).models["m"]
    assert (model.kind, model.engine, model.builtin) == ("vlm", "transformers", "tiny-llava")


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="unsupported config format '.ini'"):
        load_config(write(tmp_path, "server.ini", ""))
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(write(tmp_path, "bad.toml", "models = [\n"))


def test_preset_files(tmp_path):
    write(tmp_path, "presets/as-list.yaml", "- {layers: [1], key_mask: {}}\n")
    write(
        tmp_path,
        "presets/as-mapping.json",
        json.dumps(
            {
                "description": "from the file",
                "provenance": {"source": "file", "dataset": "x"},
                "interventions": [{"layers": [2], "temperature": {"temperature": 2.0}}],
            }
        ),
    )
    presets = [
        {"name": "list", "file": "presets/as-list.yaml"},
        {"name": "mapping", "file": "presets/as-mapping.json", "provenance": {"source": "config"}},
        {"name": "described", "file": "presets/as-mapping.json", "description": "from the config"},
    ]
    config = load_config(
        write(tmp_path, "server.yaml", json.dumps({"models": [minimal_model(presets=presets)]}))
    )
    loaded = config.models["m"].presets

    assert loaded["list"].interventions == ({"layers": [1], "key_mask": {}},)
    assert loaded["list"].file == tmp_path / "presets" / "as-list.yaml"
    assert loaded["list"].description == ""
    assert loaded["mapping"].description == "from the file"
    assert loaded["mapping"].interventions == ({"layers": [2], "temperature": {"temperature": 2.0}},)
    # The config entry's provenance and description win over the file's.
    assert dict(loaded["mapping"].provenance) == {"source": "config", "dataset": "x"}
    assert loaded["described"].description == "from the config"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{interventions: [{}], author: me}", "p.yaml): author: unknown key"),
        ("{description: no interventions}", "missing key 'interventions'"),
        ("[1]", "interventions[0]: expected a mapping"),
        ("just text", "expected a list of interventions or a mapping with 'interventions', got str"),
    ],
)
def test_bad_preset_files(tmp_path, content, message):
    write(tmp_path, "p.yaml", content)
    error = config_error(tmp_path, {"models": [minimal_model(presets=[{"name": "p", "file": "p.yaml"}])]})
    assert message in error
    assert f"models[0].presets[0].file ({tmp_path / 'p.yaml'}): " in error


def test_missing_preset_file(tmp_path):
    error = config_error(tmp_path, {"models": [minimal_model(presets=[{"name": "p", "file": "nope.yaml"}])]})
    assert "models[0].presets[0].file (" in error and "nope.yaml): cannot read it" in error


def test_resolve_path_of_a_local_directory(tmp_path):
    (tmp_path / "weights").mkdir()
    model = dict(minimal_model(), path="weights")
    del model["builtin"]
    config = load_config(write(tmp_path, "server.yaml", json.dumps({"models": [model]})))
    assert config.models["m"].resolve_path(config.cache_dir) == tmp_path / "weights"

    (tmp_path / "weights").rmdir()
    with pytest.raises(ConfigError, match="model 'm': path .*weights is not a directory"):
        config.models["m"].resolve_path(config.cache_dir)


def test_resolve_path_of_a_builtin(smollm2_path):
    config = load_config(None)
    assert config.models["smollm2"].resolve_path(smollm2_path.parent.parent) == smollm2_path


def test_vllm_settings(tmp_path):
    settings = {"tensor_parallel_size": 2, "max_model_len": 4096, "kv_cache_gib": 0.5, "enforce_eager": True}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [minimal_model(engine="vllm", vllm=settings)]}))
    model = load_config(path).models["m"]
    assert model.vllm == VllmSettings(
        tensor_parallel_size=2, max_model_len=4096, kv_cache_gib=0.5, enforce_eager=True
    )
    assert load_config(path).models["m"].vllm.gpu_memory_utilization == 0.9


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (minimal_model(vllm={"enforce_eager": True}), "models[0].vllm: vLLM settings need engine: vllm"),
        (minimal_model(engine="vllm", vllm={"tp": 2}), "models[0].vllm.tp: unknown key"),
        (
            minimal_model(engine="vllm", vllm={"tensor_parallel_size": 0}),
            "tensor_parallel_size: expected a positive",
        ),
        (
            minimal_model(engine="vllm", vllm={"enforce_eager": "yes"}),
            "enforce_eager: expected true or false",
        ),
        (minimal_model(engine="vllm", vllm={"gpu_memory_utilization": 1.5}), "expected a share in (0, 1]"),
        (minimal_model(engine="vllm", vllm={"kv_cache_gib": -1}), "kv_cache_gib: expected a positive number"),
    ],
)
def test_bad_vllm_settings(tmp_path, model, message):
    assert message in config_error(tmp_path, {"models": [model]})


def _secured(tmp_path, security: dict) -> dict:
    return {"security": security, "models": [minimal_model()]}


@pytest.mark.parametrize(
    ("security", "message"),
    [
        ({"tls": {"cert_file": "missing.crt", "key_file": "k"}}, "security.tls.cert_file: no such file"),
        ({"tls": {"cert_file": "x"}}, "security.tls: missing key 'key_file'"),
        (
            {"tokens_env": "ATTNSERVE_TEST_UNSET"},
            "security.tokens_env: environment variable ATTNSERVE_TEST_UNSET",
        ),
        ({"tokns_file": "t"}, "security.tokns_file: unknown key"),
    ],
)
def test_security_errors_name_the_key(tmp_path, monkeypatch, security, message):
    monkeypatch.delenv("ATTNSERVE_TEST_UNSET", raising=False)
    (tmp_path / "x").write_text("")
    assert message in config_error(tmp_path, _secured(tmp_path, security))


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ("short\n", "line 1: tokens need at least 16 characters"),
        ("# only a comment\n", "holds no token"),
        ("0123456789abcdef m1 m2\n", "line 1: expected a token and at most one list of models"),
    ],
)
def test_bad_tokens_files_name_the_line(tmp_path, tokens, message):
    (tmp_path / "tokens").write_text(tokens)
    error = config_error(tmp_path, _secured(tmp_path, {"tokens_file": "tokens"}))
    assert "security.tokens_file" in error and message in error


def test_tokens_are_kept_as_digests_and_merged_from_file_and_environment(tmp_path, monkeypatch):
    (tmp_path / "tokens").write_text("file-token-0123456789 m,other\n")
    monkeypatch.setenv("ATTNSERVE_TEST_TOKENS", "env-token-0123456789;env-token-9876543210")
    path = write(
        tmp_path,
        "c.yaml",
        json.dumps(_secured(tmp_path, {"tokens_file": "tokens", "tokens_env": "ATTNSERVE_TEST_TOKENS"})),
    )
    tokens = load_config(path).security.tokens
    assert len(tokens) == 3
    assert tokens.grant_for("file-token-0123456789").models == {"m", "other"}
    assert tokens.grant_for("env-token-9876543210").models is None
    assert tokens.grant_for("unknown-token-0123456789") is None
    assert "file-token" not in repr(vars(tokens))
