"""Where the hub finds Redis: a URL, a master found through Sentinel, or a
Redis Cluster known by some of its nodes; each described without its
password, and error texts scrubbed of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from smapws._config import redact_url
from smapws._core.cluster import Address


def _hosts(pairs: tuple[tuple[str, int], ...]) -> str:
    """``host:port,...``, IPv6 hosts bracketed."""
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in pairs)


@dataclass(frozen=True)
class SentinelTarget:
    """Find the master through Sentinel: ``sentinels`` are ``(host, port)``
    pairs, ``master`` the monitored name; ``password`` and ``db`` apply to the
    master (the Sentinels themselves are reached without a password)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    password: str | None = field(default=None, repr=False)
    db: int = 0

    @property
    def display(self) -> str:
        """``sentinel://host:port,.../master``: no secret, safe to log."""
        return f"sentinel://{_hosts(self.sentinels)}/{self.master}"


@dataclass(frozen=True)
class ClusterTarget:
    """A Redis Cluster, known by some of its nodes (``(host, port)`` seeds);
    ``password`` applies to every node."""

    nodes: tuple[Address, ...]
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """``cluster://host:port,...``: no secret, safe to log."""
        return "cluster://" + _hosts(self.nodes)


#: A ``redis://`` (or ``rediss://``, ``unix://``) URL, or one of the above.
Target = str | SentinelTarget | ClusterTarget


def describe(target: Target) -> str:
    """``target`` as logs and ``/health`` show it: no password."""
    return redact_url(target if isinstance(target, str) else target.display)


def safe_error(target: Target, exc: BaseException) -> str:
    """The text of ``exc`` with any password of ``target`` removed, should
    redis-py or the OS ever quote it; at most 200 characters."""
    text = str(exc)
    if isinstance(target, str):
        text = text.replace(target, redact_url(target))
    elif target.password:
        text = text.replace(target.password, "***")
    return text[:200]
