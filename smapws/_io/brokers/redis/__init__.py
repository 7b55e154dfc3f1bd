"""The Redis broker, by concern:

- :mod:`.targets`: where Redis is (URL, Sentinel, Cluster), described
  without its password;
- :mod:`.probes`: the liveness probes that prove a subscription alive;
- :mod:`.roles`: what a session subscribes (the users' pattern, per-user
  channels, one master's sharded channels);
- :mod:`.broker`: :class:`RedisBroker`, the reconnecting session of one role;
- :mod:`.client`: redis-py clients, the publishing client, and the calls
  across the trio-asyncio bridge;
- :mod:`.limits`: the server settings that would let Redis drop us;
- :mod:`.pump`: the asyncio-side read loop (the only user of redis-py's
  private parser).

The names below are what the rest of smapws imports.
"""

from __future__ import annotations

from smapws._io.brokers.redis.broker import (
    BACKOFF_BASE,
    STABLE_AFTER,
    RedisBroker,
    backoff_delay,
    disconnect_cause,
)
from smapws._io.brokers.redis.client import (
    LINK_ERRORS,
    Clients,
    PublishClient,
    client_options,
    clients_for,
    fetch_slots,
)
from smapws._io.brokers.redis.limits import (
    BURST_MESSAGES,
    RECOMMENDED_REDIS_CONFIG,
    limit_problems,
)
from smapws._io.brokers.redis.probes import (
    PROBE_CHANNEL_PREFIX,
    ProbeLost,
    ProbeTracker,
    Progress,
    watch_probes,
)
from smapws._io.brokers.redis.roles import (
    RESYNC_REASON,
    PatternSubscription,
    Role,
    ShardedLink,
    UserSubscriptions,
)
from smapws._io.brokers.redis.targets import (
    ClusterTarget,
    SentinelTarget,
    Target,
    describe,
    safe_error,
)

__all__ = [
    "BACKOFF_BASE",
    "BURST_MESSAGES",
    "LINK_ERRORS",
    "PROBE_CHANNEL_PREFIX",
    "RECOMMENDED_REDIS_CONFIG",
    "RESYNC_REASON",
    "STABLE_AFTER",
    "Clients",
    "ClusterTarget",
    "PatternSubscription",
    "ProbeLost",
    "ProbeTracker",
    "Progress",
    "PublishClient",
    "RedisBroker",
    "Role",
    "SentinelTarget",
    "ShardedLink",
    "Target",
    "UserSubscriptions",
    "backoff_delay",
    "client_options",
    "clients_for",
    "describe",
    "disconnect_cause",
    "fetch_slots",
    "limit_problems",
    "safe_error",
    "watch_probes",
]
