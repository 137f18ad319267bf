"""Configuration: every mistake is one ConfigError naming the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import base_config
from pydantic import BaseModel

from scaiproxy.config import (
    MAX_YAML_DEPTH,
    Settings,
    load_settings,
    settings_from_mapping,
)
from scaiproxy.errors import ConfigError

UPSTREAM = "http://127.0.0.1:9"
JWKS = "http://127.0.0.1:9/jwks.json"


def config(**sections: Any) -> dict[str, Any]:
    return base_config(UPSTREAM, JWKS, **sections)


def rejected(raw: dict[str, Any], environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(raw, environ=environ or {})
    return caught.value


def write(tmp_path: Path, raw: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


# --- one error per mistake, naming the key ------------------------------------


def test_wrong_type_names_key_and_value():
    error = rejected(config(upstream={"timeout_s": "abc"}))
    assert error.key == "upstream.timeout_s"
    assert str(error) == "upstream.timeout_s: expected a number, got 'abc'"


def test_wrong_type_integer():
    error = rejected(config(server={"port": "eighty"}))
    assert str(error) == "server.port: expected an integer, got 'eighty'"


def numeric_keys(
    model: type[BaseModel], annotation: type, prefix: str = ""
) -> list[str]:
    """List the dotted keys of every ``annotation`` field under ``model``."""
    keys = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys.extend(numeric_keys(kind, annotation, f"{prefix}{name}."))
        elif kind is annotation:
            keys.append(prefix + name)
    return keys


INTEGER_KEYS = numeric_keys(Settings, int)
FLOAT_KEYS = numeric_keys(Settings, float)


def test_numeric_keys_found():
    assert "server.port" in INTEGER_KEYS
    assert "upstream.timeout_s" in FLOAT_KEYS
    assert "secrets.scaivault.timeout_s" in FLOAT_KEYS


@pytest.mark.parametrize("key", INTEGER_KEYS)
def test_boolean_integer_rejected(key):
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config(), environ={}, overrides={key: True})
    assert str(caught.value) == f"{key}: expected an integer, got true"


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_boolean_float_rejected(key):
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config(), environ={}, overrides={key: False})
    assert str(caught.value) == f"{key}: expected a number, got false"


NON_FINITE = [
    pytest.param(float("inf"), id="inf"),
    pytest.param(float("-inf"), id="minus-inf"),
    pytest.param(float("nan"), id="nan"),
    pytest.param("inf", id="inf-string"),
]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_infinite_float_rejected(key, value):
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config(), environ={}, overrides={key: value})
    assert caught.value.key == key
    assert "expected a finite number" in caught.value.message


def test_yaml_inf_rejected(tmp_path):
    text = f"upstream:\n  base_url: {UPSTREAM}\n  timeout_s: .inf\n"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert str(caught.value) == "upstream.timeout_s: expected a finite number, got inf"


def test_yaml_true_port_rejected(tmp_path):
    text = f"server:\n  port: true\nupstream:\n  base_url: {UPSTREAM}\n"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert str(caught.value) == "server.port: expected an integer, got true"


def test_port_from_variable_default():
    settings = settings_from_mapping(
        config(server={"port": "${PORT:-8080}"}), environ={}
    )
    assert settings.server.port == 8080


def test_port_from_variable():
    settings = settings_from_mapping(
        config(server={"port": "${PORT:-8080}"}), environ={"PORT": "9090"}
    )
    assert settings.server.port == 9090


def test_boolean_switch_still_accepted():
    settings = settings_from_mapping(
        config(upstream={"coalesce_gets": False}), environ={}
    )
    assert settings.upstream.coalesce_gets is False


def test_body_timeout_default():
    settings = settings_from_mapping(config(), environ={})
    assert settings.server.body_timeout_s == 30


def test_body_timeout_must_be_positive():
    error = rejected(config(server={"body_timeout_s": 0}))
    assert error.key == "server.body_timeout_s"
    assert "greater than 0" in error.message


def test_wrong_type_mapping():
    error = rejected(config(logging="json"))
    assert error.key == "logging"
    assert "expected a mapping" in error.message


def test_unknown_top_level_key():
    error = rejected({**config(), "colour": "blue"})
    assert error.key == "colour"
    assert "unknown key" in error.message


def test_unknown_nested_key():
    error = rejected(config(server={"hots": "0.0.0.0"}))
    assert error.key == "server.hots"
    assert "unknown key" in error.message


def test_unknown_key_deeper():
    raw = config()
    raw["auth"]["dev_principal"] = {"tenant": "acme"}
    error = rejected(raw)
    assert error.key == "auth.dev_principal.tenant"


def test_missing_required_value():
    raw = config()
    raw["upstream"] = {"timeout_s": 5}
    error = rejected(raw)
    assert str(error) == "upstream.base_url: required value is missing"


def test_bad_enum_logging_format():
    error = rejected(config(logging={"format": "xml"}))
    assert error.key == "logging.format"
    assert error.message == "expected one of 'json', 'console' or 'auto', got 'xml'"


def test_bad_enum_environment():
    error = rejected(config(environment="prod"))
    assert error.key == "environment"
    assert "'development' or 'production'" in error.message
    assert "got 'prod'" in error.message


def test_bad_base_url():
    error = rejected(config(upstream={"base_url": "ftp://grid"}))
    assert error.key == "upstream.base_url"
    assert "expected an http or https URL" in error.message


def test_several_mistakes_in_one_error():
    error = rejected(config(upstream={"timeout_s": "abc"}, server={"port": "x"}))
    assert error.key in ("upstream.timeout_s", "server.port")
    assert "upstream.timeout_s" in str(error)
    assert "server.port" in str(error)


def test_openapi_path_needs_leading_slash():
    error = rejected(config(server={"openapi_path": "openapi.json"}))
    assert error.key == "server.openapi_path"


def test_plugin_listed_twice():
    error = rejected(config(plugins={"enabled": ["scaicore", "scaicore"]}))
    assert error.key == "plugins.enabled"
    assert "scaicore listed more than once" in str(error)


def test_empty_algorithms_rejected():
    error = rejected(config(auth={"algorithms": []}))
    assert error.key == "auth.algorithms"
    assert "RS256" in str(error)


def test_empty_algorithms_with_hs256_accepted():
    raw = config(auth={"algorithms": [], "jwks_url": None, "hs256_secret": "s" * 32})
    settings = settings_from_mapping(raw, environ={})
    assert settings.auth.algorithms == ()


def test_base_path_trailing_slash():
    error = rejected(config(server={"base_path": "/api/"}))
    assert error.key == "server.base_path"


# --- environment expansion ----------------------------------------------------


def test_variable_expanded():
    raw = config(upstream={"base_url": "${GRID_URL}"})
    settings = settings_from_mapping(raw, environ={"GRID_URL": "http://grid.test:81"})
    assert settings.upstream.base_url == "http://grid.test:81"


def test_variable_inside_text():
    raw = config(auth={"audience": "canvas-${STAGE}"})
    settings = settings_from_mapping(raw, environ={"STAGE": "eu"})
    assert settings.auth.audience == "canvas-eu"


def test_variable_default_used():
    raw = config(server={"port": "${PORT:-8123}"})
    settings = settings_from_mapping(raw, environ={})
    assert settings.server.port == 8123


def test_variable_default_ignored_when_set():
    raw = config(server={"port": "${PORT:-8123}"})
    settings = settings_from_mapping(raw, environ={"PORT": "9001"})
    assert settings.server.port == 9001


def test_empty_default_allowed():
    raw = config(auth={"audience": "canvas${SUFFIX:-}"})
    assert settings_from_mapping(raw, environ={}).auth.audience == "canvas"


def test_missing_variable_names_it_and_key():
    error = rejected(config(upstream={"base_url": "${GRID_URL}"}))
    assert error.key == "upstream.base_url"
    assert "environment variable GRID_URL is not set" in error.message


def test_missing_variable_in_list_names_index():
    error = rejected(config(auth={"issuers": ["https://a.test", "${ISSUER}"]}))
    assert error.key == "auth.issuers[1]"
    assert "ISSUER" in error.message


def test_dollar_escape():
    raw = config(auth={"audience": "cost$$5 $${NOT_A_VAR}"})
    settings = settings_from_mapping(raw, environ={})
    assert settings.auth.audience == "cost$5 ${NOT_A_VAR}"


def test_expanded_value_not_expanded_again():
    raw = config(auth={"audience": "${OUTER}"})
    settings = settings_from_mapping(raw, environ={"OUTER": "${INNER}"})
    assert settings.auth.audience == "${INNER}"


def test_invalid_placeholder_rejected():
    error = rejected(config(auth={"audience": "canvas-${1STAGE}"}))
    assert error.key == "auth.audience"
    assert "invalid placeholder" in error.message


def test_unclosed_placeholder_rejected():
    error = rejected(config(auth={"audience": "canvas-${STAGE"}))
    assert error.key == "auth.audience"


def test_variable_cannot_add_keys():
    raw = config(environment="${ENV}")
    error = rejected(raw, environ={"ENV": "development\ncolour: blue"})
    assert error.key == "environment"


# --- files --------------------------------------------------------------------


def test_explicit_path(tmp_path):
    path = write(tmp_path, config(auth={"audience": "from-file"}))
    assert load_settings(path, environ={}).auth.audience == "from-file"


def test_config_env_var(tmp_path):
    path = write(tmp_path, config(auth={"audience": "from-env-var"}))
    settings = load_settings(environ={"SCAIPROXY_CONFIG": str(path)})
    assert settings.auth.audience == "from-env-var"


def test_explicit_path_wins_over_env_var(tmp_path):
    explicit = write(tmp_path, config(auth={"audience": "explicit"}), "a.yaml")
    other = write(tmp_path, config(auth={"audience": "other"}), "b.yaml")
    settings = load_settings(explicit, environ={"SCAIPROXY_CONFIG": str(other)})
    assert settings.auth.audience == "explicit"


def test_missing_file_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing, environ={})
    assert str(missing) in str(caught.value)
    assert "not found" in str(caught.value)


def test_file_not_yaml(tmp_path):
    path = write(tmp_path, "upstream: [unclosed\n  base_url: x\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "is not valid YAML" in str(caught.value)


def test_file_not_mapping(tmp_path):
    path = write(tmp_path, "- scaicore\n- lookups\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "must contain a mapping" in str(caught.value)


def test_file_scalar_not_mapping(tmp_path):
    path = write(tmp_path, "just some text\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "must contain a mapping" in str(caught.value)


def test_file_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"environment: \xff\xfe development\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "not UTF-8" in str(caught.value)


def test_empty_file_reports_missing_upstream(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.key == "upstream"


def test_directory_as_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path, environ={})
    assert "cannot read config file" in str(caught.value)


# --- SCAIFLOW_DEPLOY_AUTH and production rules --------------------------------


def test_deploy_auth_overrides_config():
    raw = config(auth={"upstream_credentials": "user_jwt"})
    settings = settings_from_mapping(raw, environ={"SCAIFLOW_DEPLOY_AUTH": "api_key"})
    assert settings.auth.upstream_credentials == "api_key"


def test_deploy_auth_unset_keeps_config():
    raw = config(auth={"upstream_credentials": "user_jwt"})
    settings = settings_from_mapping(raw, environ={})
    assert settings.auth.upstream_credentials == "user_jwt"


def test_deploy_auth_empty_means_unset():
    raw = config(auth={"upstream_credentials": "user_jwt"})
    settings = settings_from_mapping(raw, environ={"SCAIFLOW_DEPLOY_AUTH": ""})
    assert settings.auth.upstream_credentials == "user_jwt"


def test_deploy_auth_unknown_value_names_variable():
    error = rejected(config(), environ={"SCAIFLOW_DEPLOY_AUTH": "tenant"})
    assert error.key == "auth.upstream_credentials"
    assert "SCAIFLOW_DEPLOY_AUTH" in error.message
    assert "got 'tenant'" in error.message


def test_production_rejects_disabled_auth():
    error = rejected(config(environment="production", auth={"mode": "disabled"}))
    assert error.key == "auth.mode"
    assert "production" in error.message


def test_production_rejects_hs256_secret():
    raw = config(environment="production", auth={"hs256_secret": "dev-only-secret"})
    error = rejected(raw)
    assert error.key == "auth.hs256_secret"
    assert "dev-only-secret" not in str(error)


def test_development_allows_disabled_auth():
    settings = settings_from_mapping(config(auth={"mode": "disabled"}), environ={})
    assert settings.auth.mode == "disabled"


def test_scaikey_mode_needs_audience():
    raw = config()
    del raw["auth"]["audience"]
    error = rejected(raw)
    assert error.key == "auth.audience"


def test_role_permission_with_space():
    error = rejected(config(auth={"role_permissions": {"ops": ["scaicore:view all"]}}))
    assert error.key == "auth.role_permissions.ops"


# --- the check-config command -------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "scaiproxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ,
        timeout=60,
    )


def test_cli_bad_config_exits_2(tmp_path):
    path = write(tmp_path, config(upstream={"timeout_s": "abc"}), "bad.yaml")
    result = run_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "upstream.timeout_s: expected a number, got 'abc'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_plugin_error_exits_2(tmp_path):
    raw = config(plugins={"enabled": ["scaicore", "no_such_plugin"]})
    path = write(tmp_path, raw, "bad.yaml")
    result = run_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown plugin 'no_such_plugin'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_yaml_error_exits_2(tmp_path):
    path = write(tmp_path, "upstream: [unclosed\n", "bad.yaml")
    result = run_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "is not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_good_config_exits_0(tmp_path):
    path = write(tmp_path, config(), "good.yaml")
    result = run_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout


def test_empty_section_uses_defaults(tmp_path):
    sections = {key: value for key, value in config().items() if key != "logging"}
    text = yaml.safe_dump(sections) + "logging:\n  # level: debug\n"
    settings = load_settings(write(tmp_path, text), environ={})
    assert settings.logging.format == "auto"


def test_empty_upstream_section_names_base_url():
    raw = config()
    raw["upstream"] = None
    error = rejected(raw)
    assert error.key == "upstream.base_url"


def test_override_sets_dotted_key(tmp_path):
    path = write(tmp_path, config())
    settings = load_settings(path, environ={}, overrides={"server.port": 9123})
    assert settings.server.port == 9123


def test_override_none_ignored(tmp_path):
    path = write(tmp_path, config(server={"port": 8001}))
    settings = load_settings(path, environ={}, overrides={"server.port": None})
    assert settings.server.port == 8001


def test_override_into_wrong_section_type():
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(
            config(server="fast"), environ={}, overrides={"server.port": 9123}
        )
    assert caught.value.key == "server"


# --- deeply nested YAML -----------------------------------------------------------


def flow_lists(depth: int) -> str:
    """Build ``a:`` followed by ``depth`` nested flow lists, one line."""
    return "a: " + "[" * depth + "]" * depth + "\n"


def test_deep_yaml_is_config_error(tmp_path):
    path = write(tmp_path, flow_lists(2000))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.key == ""
    assert f"the YAML in {path} is nested too deeply" in str(caught.value)


def test_deep_yaml_names_position(tmp_path):
    # The top-level mapping is the first level, so list number MAX_YAML_DEPTH
    # is one too many. That list opens at column 3 + MAX_YAML_DEPTH.
    path = write(tmp_path, flow_lists(MAX_YAML_DEPTH))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert f"line 1, column {3 + MAX_YAML_DEPTH})" in str(caught.value)


def test_deep_block_yaml_is_config_error(tmp_path):
    lines = [f"{'  ' * level}k{level}:" for level in range(MAX_YAML_DEPTH + 1)]
    path = write(tmp_path, "\n".join(lines) + " 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "is nested too deeply" in str(caught.value)


def test_yaml_at_depth_limit_parses(tmp_path):
    path = write(tmp_path, flow_lists(MAX_YAML_DEPTH - 1))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "nested too deeply" not in str(caught.value)
    assert "a: unknown key" in str(caught.value)


def test_yaml_scalars_not_counted_as_levels(tmp_path):
    lines = [f"{'  ' * level}k{level}:" for level in range(MAX_YAML_DEPTH)]
    path = write(tmp_path, "\n".join(lines) + " leaf\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "nested too deeply" not in str(caught.value)


def test_cli_deep_yaml_exits_2(tmp_path):
    path = write(tmp_path, flow_lists(2000), "deep.yaml")
    result = run_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "is nested too deeply" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- paths, URLs and names that would break only at run time ---------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("base_path", "/api/../x"),
        ("base_path", "/{x}"),
        ("base_path", "/a b"),
        ("base_path", "/api?x"),
        ("base_path", "/é"),
        ("base_path", "/metrics"),
        ("openapi_path", "/healthz"),
        ("openapi_path", "/docs/{name}"),
        ("openapi_path", "openapi.json"),
    ],
)
def test_server_path_rejected(key, value):
    error = rejected(config(server={key: value}))
    assert error.key == f"server.{key}"
    assert "expected a path" in str(error) or "operational route" in str(error)


@pytest.mark.parametrize("value", ["/api", "/scaiproxy-api/v2", "/a.b_c~d"])
def test_server_base_path_accepted(value):
    settings = settings_from_mapping(config(server={"base_path": value}), environ={})
    assert settings.server.base_path == value


@pytest.mark.parametrize("value", ["file:///etc/passwd", "jwks.json", "ftp://h/j"])
def test_jwks_url_scheme_rejected(value):
    error = rejected(config(auth={"jwks_url": value}))
    assert error.key == "auth.jwks_url"
    assert "http or https URL" in str(error)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("auth.env_api_key_var", ""),
        ("auth.env_api_key_var", "A=B"),
        ("auth.env_api_key_var", "9KEY"),
        ("secrets.scaivault.token_env", "VAULT TOKEN"),
    ],
)
def test_environment_variable_name_rejected(key, value):
    section, _, rest = key.partition(".")
    raw = config()
    if "." in rest:
        block, _, field = rest.partition(".")
        raw[section] = {**raw[section], block: {field: value}}
    else:
        raw[section] = {**raw[section], rest: value}
    error = rejected(raw)
    assert error.key == key
    assert "environment variable name" in str(error)


def test_leeway_over_five_minutes_rejected():
    error = rejected(config(auth={"leeway_s": 1e15}))
    assert error.key == "auth.leeway_s"
