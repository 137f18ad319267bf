"""Configuration: YAML with environment expansion, validated at start-up.

Every mistake becomes one :class:`~scaiproxy.errors.ConfigError` naming the key
path, for example ``upstream.timeout_s: expected a number, got 'abc'``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from scaiproxy.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

CONFIG_ENV_VAR = "SCAIPROXY_CONFIG"
DEPLOY_AUTH_ENV_VAR = "SCAIFLOW_DEPLOY_AUTH"

# ``$$``, ``${NAME}``, ``${NAME:-default}``, and any other ``${`` (an error).
_placeholder = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")

DEFAULT_ROLE_PERMISSIONS: dict[str, list[str]] = {
    "super_admin": ["scaicore:*"],
    "partner_admin": ["scaicore:*"],
    "tenant_admin": ["scaicore:*"],
    "tenant_viewer": ["scaicore:view"],
    "tenant_user": [],
}


class _Model(BaseModel):
    """Base of every config model: numbers must be finite, and never true or false."""

    # allow_inf_nan=False rejects YAML's .inf and .nan in every float field.
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _reject_bool_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true and false as 1 and 0, so "port: true" would be 1.
        if not isinstance(value, bool) or info.field_name is None:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        if annotation is int:
            raise ValueError(f"expected an integer, got {str(value).lower()}")
        if annotation is float:
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class _Section(_Model):
    model_config = ConfigDict(extra="forbid")


#: A path the gateway serves under, of unreserved characters: it needs no
#: escaping and contains no aiohttp {variable}.
_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+")
#: Paths that the gateway serves itself, outside server.base_path.
OPERATIONAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: A POSIX environment variable name.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise ValueError(
            "expected an environment variable name of letters, digits and _, "
            f"such as SCAIGRID_API_KEY; got {value[:100]!r}"
        )
    return value


def _check_path(value: str, example: str) -> str:
    segments = value.split("/")[1:]
    if not _PATH.fullmatch(value) or any(part in (".", "..") for part in segments):
        raise ValueError(
            f"expected a path such as {example}: a leading slash, segments of "
            "letters, digits and . _ ~ - (not . or ..), no trailing slash; "
            f"got {value[:100]!r}"
        )
    return value


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    base_path: str = "/api"
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    shutdown_timeout_s: float = Field(30.0, gt=0)
    openapi_path: str = "/openapi.json"

    @field_validator("openapi_path")
    @classmethod
    def _check_openapi_path(cls, value: str) -> str:
        _check_path(value, "/openapi.json")
        if value in OPERATIONAL_PATHS:
            raise ValueError(
                f"{value} is an operational route of the gateway; choose another "
                "path, such as /openapi.json"
            )
        return value

    @field_validator("base_path")
    @classmethod
    def _check_base_path(cls, value: str) -> str:
        if value in ("", "/"):
            return ""
        _check_path(value, "/api")
        if value in OPERATIONAL_PATHS:
            raise ValueError(
                f"{value} is an operational route of the gateway; choose another "
                "path, such as /api"
            )
        return value


class UpstreamConfig(_Section):
    base_url: str
    allowed_base_urls: tuple[str, ...] = ()
    connect_timeout_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(100, gt=0)
    max_response_bytes: int = Field(16 * 1024 * 1024, gt=0)
    coalesce_gets: bool = True

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return normalize_base_url(value)

    @field_validator("allowed_base_urls")
    @classmethod
    def _check_allowed(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(normalize_base_url(value) for value in values)

    def allows(self, base_url: str) -> bool:
        """Tell whether a tenant may send its traffic to ``base_url``."""
        url = normalize_base_url(base_url)
        return url == self.base_url or url in self.allowed_base_urls


class DevPrincipal(_Section):
    sub: str = "dev-user"
    tenant_id: str = "dev-tenant"
    partner_id: str | None = None
    roles: tuple[str, ...] = ("tenant_admin",)
    permissions: tuple[str, ...] = ()


class AuthConfig(_Section):
    mode: Literal["scaikey", "disabled"] = "scaikey"
    jwks_url: str | None = None
    issuers: tuple[str, ...] = ()
    audience: str | None = None
    algorithms: tuple[Literal["RS256", "RS384", "RS512", "ES256", "ES384"], ...] = (
        "RS256",
        "ES256",
    )
    # Clock skew allowed on exp, nbf and iat; more than 5 minutes would keep
    # expired tokens alive long enough to defeat their expiry.
    leeway_s: float = Field(30.0, ge=0, le=300)
    hs256_secret: str | None = None
    dev_principal: DevPrincipal = DevPrincipal()
    role_permissions: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: {
            role: tuple(perms) for role, perms in DEFAULT_ROLE_PERMISSIONS.items()
        }
    )
    jwks_cache_ttl_s: float = Field(300.0, gt=0)
    jwks_refresh_interval_s: float = Field(30.0, ge=0)
    jwks_timeout_s: float = Field(5.0, gt=0)
    token_cache_size: int = Field(10_000, ge=0)
    upstream_credentials: Literal["auto", "user_jwt", "api_key"] = "auto"
    env_api_key_var: str = "SCAIGRID_API_KEY"

    @field_validator("jwks_url")
    @classmethod
    def _check_jwks_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from yarl import URL

        try:
            url = URL(value)
        except (ValueError, TypeError):
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"expected an http or https URL of ScaiKey's JWKS document, got "
                f"{value[:100]!r}"
            )
        return value

    @field_validator("env_api_key_var")
    @classmethod
    def _check_env_api_key_var(cls, value: str) -> str:
        return _check_env_name(value)


class FileSecretsConfig(_Section):
    path: str = "var/secrets.json"


class ScaiVaultConfig(_Section):
    base_url: str = ""
    token_env: str = "SCAIVAULT_TOKEN"
    timeout_s: float = Field(5.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return normalize_base_url(value) if value else value

    @field_validator("token_env")
    @classmethod
    def _check_token_env(cls, value: str) -> str:
        return _check_env_name(value)


class SecretsConfig(_Model):
    # Extra keys are the blocks of secret backends that plugins add.
    model_config = ConfigDict(extra="allow")

    backend: str = "file"
    cache_ttl_s: float = Field(30.0, ge=0)
    file: FileSecretsConfig = FileSecretsConfig()
    scaivault: ScaiVaultConfig = ScaiVaultConfig()

    def block(self, name: str) -> Mapping[str, Any]:
        """Return the raw config block of backend ``name``."""
        value = getattr(self, name, None)
        if isinstance(value, BaseModel):
            return value.model_dump()
        extra = self.model_extra or {}
        return extra.get(name) or {}


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class PluginsConfig(_Model):
    # Extra keys are the plugins' own blocks, validated by each plugin.
    model_config = ConfigDict(extra="allow")

    enabled: tuple[str, ...] = ("scaicore", "lookups", "tenants")

    def block(self, name: str) -> dict[str, Any]:
        """Return the raw ``plugins.<name>`` block, empty when absent."""
        value = (self.model_extra or {}).get(name)
        return dict(value) if isinstance(value, Mapping) else {}

    def blocks(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Settings(_Section):
    """The whole, validated configuration."""

    environment: Literal["development", "production"] = "development"
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig
    auth: AuthConfig = AuthConfig()
    secrets: SecretsConfig = SecretsConfig()
    logging: LoggingConfig = LoggingConfig()
    plugins: PluginsConfig = PluginsConfig()

    @property
    def production(self) -> bool:
        return self.environment == "production"


def normalize_base_url(value: str) -> str:
    """Check an http(s) base URL and strip its trailing slash."""
    from yarl import URL

    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http or https URL, got {value!r}")
    if url.query_string or url.fragment or url.user or url.password:
        raise ValueError(
            f"expected a base URL without query, fragment or credentials, got {value!r}"
        )
    return str(url).rstrip("/")


def expand_env(value: Any, environ: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of ``value``.

    Expansion runs on the parsed YAML, so a variable can never add keys or change
    the document's structure. ``$$`` stands for a literal ``$``.
    """
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            if match.group(0) == "${":
                raise ConfigError(
                    path,
                    f"invalid placeholder at character {match.start() + 1}; write "
                    "${NAME} or ${NAME:-default} with NAME of letters, digits and "
                    "_, or $$ for a literal $",
                )
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(
                path,
                f"environment variable {name} is not set; set it or write "
                f"${{{name}:-default}}",
            )

        return _placeholder.sub(replace, value)
    if isinstance(value, Mapping):
        return {
            key: expand_env(item, environ, _join(path, str(key)))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            expand_env(item, environ, f"{path}[{index}]")
            for index, item in enumerate(value)
        ]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, expand and validate the config file.

    ``path`` falls back to ``$SCAIPROXY_CONFIG``, then to ``config.yaml`` in the
    working directory. ``overrides`` maps dotted keys to values (the CLI's
    ``--host`` and ``--port``).
    """
    environ = os.environ if environ is None else environ
    config_path = Path(path or environ.get(CONFIG_ENV_VAR) or "config.yaml")
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "", f"config file {str(config_path)!r} not found; pass --config PATH"
        ) from None
    except OSError as exc:
        raise ConfigError(
            "", f"cannot read config file {str(config_path)!r}: {exc}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"config file {str(config_path)!r} is not UTF-8 text: {exc}"
        ) from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader
    except _NestedTooDeeply as exc:
        mark = exc.problem_mark
        raise ConfigError(
            "",
            f"the YAML in {config_path} is nested too deeply (more than "
            f"{MAX_YAML_DEPTH} levels of mappings and lists, at line "
            f"{mark.line + 1}, column {mark.column + 1})",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{config_path} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"{config_path} must contain a mapping of keys")
    return settings_from_mapping(raw, environ=environ, overrides=overrides)


#: Maximum nesting of mappings and lists in the config file. PyYAML's composer
#: recurses once per level and exhausts Python's recursion limit at about 330
#: levels (PyYAML 6, default limit of 1000), while a config needs a handful.
MAX_YAML_DEPTH = 100


class _NestedTooDeeply(yaml.composer.ComposerError):
    """The document nests deeper than :data:`MAX_YAML_DEPTH` levels."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter where a config file must be.

    A repeated key is an error instead of silently winning over the first, and
    aliases are refused: a config needs none, and nested aliases can expand a
    few lines into gigabytes or into a cycle. Nesting is capped at
    :data:`MAX_YAML_DEPTH` levels, so a deep document is an error and not a
    ``RecursionError``.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not supported in the config; repeat the value",
                event.start_mark,
            )
        if not self.check_event(yaml.events.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= MAX_YAML_DEPTH:
            raise _NestedTooDeeply(
                None, None, "nested too deeply", self.peek_event().start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}; each key may appear once",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def settings_from_mapping(
    raw: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Validate an already parsed config mapping (tests build configs this way)."""
    environ = os.environ if environ is None else environ
    data = expand_env(dict(raw), environ)
    for section in Settings.model_fields:
        # A YAML section whose keys are all commented out parses as null.
        if section in data and data[section] is None:
            data[section] = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    deploy_auth = environ.get(DEPLOY_AUTH_ENV_VAR)
    if deploy_auth:
        auth = data.setdefault("auth", {})
        if isinstance(auth, dict):
            auth["upstream_credentials"] = deploy_auth.strip()
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        errors = format_errors(exc)
        if deploy_auth and any(key == "auth.upstream_credentials" for key, _ in errors):
            errors = [
                (
                    (key, f"{message} (set by {DEPLOY_AUTH_ENV_VAR})")
                    if key == "auth.upstream_credentials"
                    else (key, message)
                )
                for key, message in errors
            ]
        raise ConfigError(errors[0][0], _join_messages(errors)) from None
    check_settings(settings)
    return settings


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            return  # validation reports the section's wrong type
        node = child
    node[last] = value


def _join_messages(errors: list[tuple[str, str]]) -> str:
    first = errors[0][1]
    if len(errors) == 1:
        return first
    rest = "; ".join(f"{key}: {message}" for key, message in errors[1:])
    return f"{first}; also {rest}"


def parse_block(model: type[ModelT], block: Mapping[str, Any], prefix: str = "") -> ModelT:
    """Validate a config block with a pydantic model, raising :class:`ConfigError`.

    The error names the first bad key, under ``prefix`` when given. Plugins call
    this from ``scaiproxy_configure`` with no prefix: the core adds
    ``plugins.<name>``.
    """
    try:
        return model.model_validate(block)
    except ValidationError as exc:
        key, message = format_errors(exc, prefix)[0]
        raise ConfigError(key, message) from None


def format_errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Turn pydantic errors into ``(key path, message)`` pairs."""
    result = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        key = _join(prefix, location) if location else prefix
        result.append((key, describe_error(error)))
    return result


_EXPECTED = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def describe_error(error: Mapping[str, Any], show_input: bool = True) -> str:
    """Describe one pydantic error in the words of the config and request docs.

    ``show_input=False`` leaves out the rejected value, for fields that may hold
    a secret.
    """
    message = _describe(error)
    if not show_input:
        message = message.split(", got ", 1)[0]
    return message


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind == "missing":
        return "required value is missing"
    if kind == "extra_forbidden":
        return "unknown key; check its spelling against the documentation"
    if kind in _EXPECTED:
        return f"{_EXPECTED[kind]}, got {_show(given)}"
    if kind == "literal_error":
        allowed = error.get("ctx", {}).get("expected", "")
        return f"expected one of {allowed}, got {_show(given)}"
    if kind == "value_error":
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {_show(given)}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_settings(settings: Settings) -> None:
    """Check the rules that span several keys."""
    auth = settings.auth
    if settings.production:
        if auth.mode == "disabled":
            raise ConfigError(
                "auth.mode",
                "'disabled' is not allowed with environment: production; "
                "use scaikey",
            )
        if auth.hs256_secret:
            raise ConfigError(
                "auth.hs256_secret",
                "a shared HS256 secret is for development only; remove it "
                "in production",
            )
    if auth.mode == "scaikey":
        if not auth.jwks_url and not auth.hs256_secret:
            raise ConfigError(
                "auth.jwks_url",
                "required value is missing with auth.mode: scaikey (or set "
                "auth.hs256_secret in development)",
            )
        if not auth.issuers:
            raise ConfigError("auth.issuers", "list at least one accepted token issuer")
        if not auth.audience:
            raise ConfigError(
                "auth.audience",
                "required value is missing; set it to the ScaiKey OAuth client id",
            )
    for role, permissions in auth.role_permissions.items():
        for permission in permissions:
            if not permission or " " in permission:
                raise ConfigError(
                    f"auth.role_permissions.{role}",
                    f"invalid permission {permission!r}; use a name such as "
                    "scaicore:view or a wildcard such as scaicore:*",
                )
    enabled = settings.plugins.enabled
    repeated = sorted({name for name in enabled if enabled.count(name) > 1})
    if repeated:
        raise ConfigError(
            "plugins.enabled",
            f"{', '.join(repeated)} listed more than once; list each plugin once",
        )
    auth = settings.auth
    if auth.mode == "scaikey" and auth.jwks_url and not auth.algorithms:
        raise ConfigError(
            "auth.algorithms",
            "empty, so no token signed with ScaiKey's keys could be verified; "
            "list one or more of RS256, RS384, RS512, ES256, ES384, or leave "
            "the key out for RS256 and ES256",
        )
