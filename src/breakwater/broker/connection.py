"""Redis clients that reconnect with exponential backoff and jitter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from breakwater.broker.cluster import ClusterPipelinedRedis, Fast
from breakwater.broker.wire import Endpoint, PipelinedRedis
from breakwater.config import CommonSettings
from breakwater.secret import secret

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # -> TLS
MAX_PORT = 65535


@dataclass(frozen=True)
class ClusterUrl:
    """``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://``: TLS);
    the hosts are seeds: any reachable one tells the client the whole cluster's layout."""

    seeds: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None
    password: str | None
    ca_certs: str | None = None
    verify: bool = True

    @classmethod
    def parse(cls, url: str) -> ClusterUrl | None:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in CLUSTER_SCHEMES:
            return None
        rest, _, query_string = rest.partition("?")
        netloc, _, db = rest.partition("/")
        creds, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = creds.partition(":")
            username, password = (unquote(user) or None), (unquote(secret) if colon else None)
        seeds: list[tuple[str, int]] = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
                raise ValueError("a cluster URL lists its seeds as host:port, separated by commas")
            seeds.append((host.strip("[]"), int(port)))
        query = parse_qs(query_string)
        if db not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0")
        return cls(
            tuple(seeds),
            CLUSTER_SCHEMES[scheme],
            username,
            password,
            query["ssl_ca_certs"][0] if query.get("ssl_ca_certs") else None,
            (query.get("ssl_cert_reqs") or ["required"])[0] != "none",
        )


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a Redis (or Redis Cluster) URL; None if nothing. Never quotes
    the URL: a part of its password may be what the parser took for a port."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in {"redis", "rediss", "unix", *CLUSTER_SCHEMES}:
        return (
            f"a Redis URL begins with one of redis://, rediss://, unix://, {'://, '.join(CLUSTER_SCHEMES)}://"
        )
    try:
        if ClusterUrl.parse(url) is None:
            parse_url(url)
    except ValueError:
        return (
            "not a Redis URL: redis[s]://[[user]:password@]host[:port][/db], unix:///path[?db=N] or "
            "redis[s]+cluster://[[user]:password@]host:port[,host:port...] (a password's special "
            "characters percent-encoded)"
        )
    return None


# RESP2, whatever redis-py's default (8.x moved it to RESP3): the reply shapes every caller reads
# (XREADGROUP, XAUTOCLAIM, Pub/Sub messages) and the measured CPU per command stay as tested.
RESP = 2


def connect(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    max_connections: int = 256,
    socket_timeout_s: float | None = 10.0,
) -> Redis:
    """A pooled client; commands retry transient connection errors with jittered backoff.
    ``username``/``password`` (an ACL user) override any given in the URL. ``socket_timeout_s``
    bounds every reply: a half-open connection fails the command instead of hanging it forever.
    When all ``max_connections`` are busy (a burst), a command waits for one (up to the socket
    timeout) instead of failing at once."""
    auth: dict[str, Any] = {k: v for k, v in (("username", username), ("password", password)) if v}
    cluster = ClusterUrl.parse(url)
    if cluster is not None:
        return _cluster_client(cluster, auth, socket_timeout_s, max_connections)
    # TCP keepalive is a TCP socket's option: redis-py's unix socket connection refuses it.
    keepalive = {} if urlsplit(url).scheme == "unix" else {"socket_keepalive": True}
    pool = BlockingConnectionPool.from_url(
        without_credentials(url) if auth else url,  # redis-py lets the URL's win over arguments
        **auth,
        **keepalive,
        timeout=socket_timeout_s,
        decode_responses=True,
        protocol=RESP,
        max_connections=max_connections,
        # A lost connection, or a connect that timed out (the builtin TimeoutError), is retried (a
        # reply lost with it is made good by idempotent writes: docs/reliability.md); a reply
        # overdue (redis-py's TimeoutError) is not: it already waited the socket timeout, and a Redis
        # that stalls (alive, not answering) made every command wait it four times (40 s before a 503
        # the guide promises after 10).
        retry=Retry(
            EqualJitterBackoff(cap=2.0, base=0.05),
            retries=3,
            supported_errors=(RedisConnectionError, TimeoutError),
        ),
        health_check_interval=15,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout_s,
    )
    return Redis.from_pool(pool)


def without_credentials(url: str) -> str:
    """``url`` without a user or password, in its authority or its query (``redis://u:p@h:1/0`` ->
    ``redis://h:1/0``, ``unix://u@/run/redis.sock?password=p`` -> ``unix:///run/redis.sock``)."""
    if "://" not in url:
        return url
    scheme, _creds, hosts, path, query, fragment = _split(url)
    kept = [item for item in query.split("&") if item and item.partition("=")[0] not in CREDENTIALS]
    return _join(scheme, "", hosts, path, "&".join(kept), fragment)


def redacted(url: str) -> str:
    """``url`` with its password masked (in its authority, or a unix socket URL's ``?password=``),
    for logs; never raises."""
    if "://" not in url:
        return url
    scheme, creds, hosts, path, query, fragment = _split(url)
    user, colon, _password = creds.partition(":")
    masked = [
        f"{name}=***" if name == "password" else item
        for item in query.split("&")
        for name in [item.partition("=")[0]]
    ]
    return _join(scheme, f"{user}:***" if colon else creds, hosts, path, "&".join(masked), fragment)


CREDENTIALS = ("username", "password")


def _split(url: str) -> tuple[str, str, str, str, str, str]:
    """(scheme, credentials, hosts, path, query, fragment) by plain string splitting: any number of
    hosts (a cluster's seeds), IPv6 brackets, and a unix socket's empty authority stay as they are."""
    scheme, _, rest = url.partition("://")
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    creds, _, hosts = authority.rpartition("@")
    return scheme, creds, hosts, slash + path, query, fragment


def _join(scheme: str, creds: str, hosts: str, path: str, query: str, fragment: str) -> str:
    url = f"{scheme}://{creds}{'@' if creds else ''}{hosts}{path}"
    return url + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


def _cluster_client(
    url: ClusterUrl, auth: dict[str, Any], socket_timeout_s: float | None, max_connections: int
) -> Redis:
    """redis-py's cluster client (MOVED/ASK/TRYAGAIN/CLUSTERDOWN, topology refresh, primaries
    only), typed as the :class:`Redis` whose commands it shares: the broker's multi-key commands
    stay within one hash slot (docs/architecture.md, "Redis Cluster")."""
    creds = auth or {"username": url.username, "password": url.password}  # given ones replace the URL's
    tls: dict[str, Any] = {}
    if url.tls:
        reqs = "required" if url.verify else "none"
        tls = {"ssl": True, "ssl_ca_certs": url.ca_certs, "ssl_cert_reqs": reqs}
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in url.seeds],
        **{k: v for k, v in creds.items() if v},
        **tls,
        decode_responses=True,
        protocol=RESP,
        # Also the redirections and failovers it follows (MOVED, ASK, TRYAGAIN, CLUSTERDOWN).
        retry=Retry(EqualJitterBackoff(cap=2.0, base=0.05), retries=8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout_s,
        socket_keepalive=True,
        # Per node, and not a blocking pool: past it a command fails, so leave room (the hot path
        # does not use these connections).
        max_connections=max(1024, max_connections),
    )
    return cast(Redis, client)


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


def fast_client(redis: Redis, timeout_s: float | None) -> Fast:
    """The hot path's raw pipelined connection(s) to the server(s) ``redis`` talks to."""
    if not isinstance(redis, RedisCluster):
        return PipelinedRedis(redis, timeout_s)
    kw: dict[str, Any] = redis.connection_kwargs
    tls = issubclass(kw.get("connection_class", Connection), SSLConnection)
    seed = Redis(
        username=kw.get("username"),
        password=kw.get("password"),
        ssl=tls,
        ssl_ca_certs=kw.get("ssl_ca_certs"),
        ssl_cert_reqs=kw.get("ssl_cert_reqs") or "required",
    )
    base = Endpoint.of(seed)
    nodes = redis.get_nodes() or redis.nodes_manager.startup_nodes.values()
    return ClusterPipelinedRedis([base.at(n.host, n.port) for n in nodes], timeout_s)


def connect_with(settings: CommonSettings) -> Redis:
    """The client a process's settings describe (URL, ACL user and password)."""
    return connect(
        settings.redis_url,
        username=settings.redis_username,
        password=secret(settings.redis_password, settings.redis_password_file),
        max_connections=settings.redis_max_connections,
        socket_timeout_s=settings.redis_socket_timeout_s,
    )
