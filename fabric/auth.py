"""Ray token authentication for a driver that joins a cluster: which mode to use, and a clear
`FabricError` when authentication is what fails.

How Ray 2.60 reads the mode: `RAY_AUTH_MODE` goes into Ray's C++ config when `ray._raylet` is
imported, and again whenever `ray._raylet.Config.initialize("")` runs (Ray's own `ray.init` does
that when it turns a new local cluster to token mode). Setting the variable after `import ray`
therefore changes nothing by itself; re-initialising the config does, as long as no connection
is up. Ray's token loader caches the token, so it is reset too. `ray.init()` of a local cluster
also writes `~/.ray/auth_token` and sets `RAY_AUTH_MODE=token` in its own process, so a token
file says nothing about the cluster a driver is about to join: the mode is never chosen from it.

The choice, made just before `ray.init(address=...)`:

* `RAY_AUTH_MODE` set by the user: used as is. When the cluster clearly says otherwise (it
  requires a token, or it has no authentication and would leave every actor unstarted) the
  connection is not attempted: `FabricError` says what to set.
* unset (or set only by this module, or by Ray's local `ray.init`): one unauthenticated gRPC
  call, the same first call `ray.init` makes (GCS `GetClusterId` for `host:port` and `auto`,
  the Ray client's `ClusterInfo(PING)` for `ray://`). `UNAUTHENTICATED` -> token mode, said on
  stderr; an answer -> no token mode (`RAY_AUTH_MODE=disabled` for the `ray.init` call only, so
  Ray does not turn token mode on for `address="auto"` because a token file exists); no answer
  (unreachable, TLS trouble, not a Ray server) -> Ray's own defaults, and Ray's own error.
* in token mode, a second call with the driver's token: a refused token fails at once with
  `FabricError` instead of Ray retrying for 20-30 s and reporting a connection failure.

Cost: one or two local round trips to the cluster (milliseconds) per connection; at most
`PROBE_TIMEOUT_S` when the address does not answer. Ray is never imported at module import.
"""

from __future__ import annotations

import contextlib
import os
import sys

from fabric.errors import FabricError

AUTH_ENV = "RAY_AUTH_MODE"
PROBE_TIMEOUT_S = 5.0
_GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"    # request: empty message
_CLIENT_METHOD = "/ray.rpc.RayletDriver/ClusterInfo"
_CLIENT_PING = b"\x08\x06"                                    # ClusterInfoRequest(type=PING)

TOKEN_FILES = ("~/.ray/auth_token, in the file named by RAY_AUTH_TOKEN_PATH, "
               "or in RAY_AUTH_TOKEN")
TOKEN_PLACES = f"the cluster's token in {TOKEN_FILES}"
HOW_TO = (f"for a cluster with token authentication set RAY_AUTH_MODE=token and put "
          f"{TOKEN_PLACES}; for a cluster without authentication unset RAY_AUTH_MODE")

_auto: str | None = None     # a RAY_AUTH_MODE value put in os.environ by us or Ray, not the user


def user_mode() -> str | None:
    """RAY_AUTH_MODE as the user set it; None when unset, empty, or set by us or by Ray."""
    value = os.environ.get(AUTH_ENV) or None
    return None if value is not None and value == _auto else value


def local_cluster_started(before: str | None) -> None:
    """After `ray.init` of a local cluster: Ray sets RAY_AUTH_MODE=token in this process when
    it was unset. Remember that this was not the user's choice."""
    global _auto
    if not before and os.environ.get(AUTH_ENV):
        _auto = os.environ[AUTH_ENV]


def endpoint(address: str | None) -> tuple[str, str] | None:
    """("gcs" | "client", "host:port") that `ray.init(address)` talks to first; None if unknown."""
    addr = address
    if addr in (None, "auto"):
        addr = os.environ.get("RAY_ADDRESS") or addr
    if addr in (None, "auto"):
        addr = _running_cluster()
    if not addr or addr == "local":
        return None
    if "://" in addr:
        scheme, _, rest = addr.partition("://")
        host = rest.split("/")[0]
        if scheme != "ray" or not host:
            return None
        return "client", host if ":" in host else f"{host}:10001"     # Ray's client port
    return "gcs", addr


def _running_cluster() -> str | None:
    """The GCS address `ray.init(address="auto")` would pick, found as Ray finds it."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:      # no cluster found, or Ray's private helper moved: Ray will say
        return None


def _credentials():
    """TLS channel credentials when Ray runs with TLS (RAY_USE_TLS), else None."""
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return None
    import grpc
    from ray._common.tls_utils import load_certs_from_env

    cert, key, ca = load_certs_from_env()
    return grpc.ssl_channel_credentials(certificate_chain=cert, private_key=key,
                                        root_certificates=ca)


def probe(kind: str, target: str, header: dict | None = None,
          timeout: float = PROBE_TIMEOUT_S) -> bool | None:
    """One gRPC call to the cluster. True: refused as unauthenticated; False: answered;
    None: no usable answer (unreachable, not a Ray server, no grpc)."""
    try:
        import grpc

        creds = _credentials()
    except Exception:
        return None
    method, request = (_GCS_METHOD, b"") if kind == "gcs" else (_CLIENT_METHOD, _CLIENT_PING)
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    try:
        with channel:
            call = channel.unary_unary(method, request_serializer=bytes,
                                       response_deserializer=bytes)
            call(request, timeout=timeout, metadata=tuple((header or {}).items()) or None)
        return False
    except grpc.RpcError as e:
        return True if e.code() == grpc.StatusCode.UNAUTHENTICATED else None
    except Exception:
        return None


def token_source() -> str:
    """Where Ray takes the token from (its order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


def token_header() -> dict:
    """The authorization header Ray's own loader would send; {} when there is no token."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        loader.reset_cache()
        return dict(loader.get_token_for_http_header(ignore_auth_mode=True) or {})
    except Exception:       # no Ray, or RAY_AUTH_TOKEN_PATH names a missing/empty file
        return {}


def set_mode(mode: str | None, reload: bool = True) -> None:
    """Put `mode` in RAY_AUTH_MODE (None: remove it) and make an imported Ray read it again.
    Never reload while connected: that would reset the config Ray got from the cluster."""
    if mode is None:
        os.environ.pop(AUTH_ENV, None)
    else:
        os.environ[AUTH_ENV] = mode
    if reload and "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _problem(where: str, what: str) -> FabricError:
    return FabricError(f"Ray authentication problem with the cluster at {where}: {what}")


def _no_token(where: str) -> FabricError:
    return _problem(where, f"it requires token authentication and this driver has no token "
                           f"(looked in {token_source()}): set RAY_AUTH_MODE=token and put "
                           f"{TOKEN_PLACES}")


@contextlib.contextmanager
def connecting(address: str):
    """Around `ray.init(address=...)` for a driver joining a cluster: chooses the mode (see the
    module docstring) and turns any failure into a `FabricError` that names the cause."""
    global _auto
    ep = endpoint(address)
    where = repr(address) if ep is None or ep[1] in address else f"{address!r} ({ep[1]})"
    required = probe(*ep) if ep else None
    user = user_mode()
    temporary = False
    if user is not None:                    # the user's choice: used as is, or refused
        if user.lower() != "token" and required:
            raise _problem(where, f"it requires token authentication but RAY_AUTH_MODE={user}: "
                                  f"set RAY_AUTH_MODE=token (or unset it) and put {TOKEN_PLACES}")
        if user.lower() == "token" and required is False:
            raise _problem(where, "RAY_AUTH_MODE=token but the cluster does not use token "
                                  "authentication (actors started from a token-mode driver "
                                  "never run there): unset RAY_AUTH_MODE for this cluster")
        set_mode(user)                      # read again: it may have been set after import
    elif required:
        if not token_header():
            raise _no_token(where)
        set_mode("token")
        _auto = "token"
        print(f"kv-fabric: the Ray cluster at {where} requires token authentication: "
              f"using RAY_AUTH_MODE=token (token from {token_source()})", file=sys.stderr)
    elif required is False:                 # not Ray's token-file default for "auto"
        set_mode("disabled")
        temporary = True
    if required and os.environ.get(AUTH_ENV, "").lower() == "token":
        header = token_header()
        if not header:
            raise _no_token(where)
        if probe(*ep, header=header):
            raise _problem(where, f"it refused this driver's token (from {token_source()}): "
                                  f"use the cluster's token, in {TOKEN_FILES}")
    try:
        yield
    except Exception as e:
        raise connect_error(address, e, required) from None
    finally:
        if temporary:               # Ray keeps "disabled" for this connection; unset = disabled
            set_mode(None, reload=False)
            _auto = None


def connect_error(address: str, e: Exception, required: bool | None = None) -> FabricError:
    """The `FabricError` for a failed `ray.init(address)`."""
    text = str(e)
    low = text.lower()
    if type(e).__name__ == "AuthenticationError" or "authentication" in low \
            or "unauthenticated" in low:
        return _problem(repr(address), f"{text.splitlines()[0] if text else type(e).__name__}; "
                                       f"{HOW_TO}")
    hint = ""
    if required is None and os.environ.get(AUTH_ENV, "").lower() != "token":
        hint = (" (if the cluster uses token authentication, as `ray start` sets it up: "
                f"set RAY_AUTH_MODE=token and put {TOKEN_PLACES})")
    return FabricError(f"could not connect to Ray at {address!r}: {e}{hint}")
