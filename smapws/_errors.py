"""The exceptions smapws raises, as one tree.

Every exception smapws defines derives from :class:`SmapwsError`, so a caller
can catch "anything the hub decided to refuse or report" in one clause, and
trio's and the standard library's own exceptions stay distinguishable from it.
Each class is defined beside the code that raises it (``_core`` imports only
this module, which does no I/O); this docstring is the map::

    SmapwsError
    ├── ConfigError          smapws._config: a setting is missing or invalid
    │                        (also a ValueError, as it always was)
    ├── AuthError            smapws._core.auth: a token was refused; ``reason``
    ├── HttpError            smapws._core.http: a request head answered ``status``
    ├── TopologyError        smapws._core.cluster: an unreadable CLUSTER SLOTS
    │                        reply (also a ValueError)
    ├── BrokerError          smapws._io.brokers: publishing failed (Redis, or
    │                        the in-process router queue full)
    ├── ProbeLost            smapws._io.brokers.redis.probes: a subscription's
    │                        liveness probe went unanswered (the session ends)
    ├── _SubscriptionEnded   smapws._io.brokers.redis.broker: Redis ended a
    │                        subscription (internal: caught by its loop)
    ├── ListenError          smapws._io.server: cannot listen on host:port
    ├── ChannelError         smapws._io.supervisor: a bad control message
    ├── NotifyAddressError   smapws._io.sdnotify: an unusable $NOTIFY_SOCKET
    │                        (also a ValueError)
    └── _Refused             smapws._io.frontdoor: a refused publish request

Not under the root:

- ``InvalidMessage`` (a broker message that cannot be delivered; a
  ``ValueError``) is defined by ``smapws_publisher``, the publishers' own
  distribution, which does not depend on smapws; the hub re-exports it from
  :mod:`smapws._core.envelope` and does **not** wrap it. Its ``reason`` is a
  metric label and the hub's callers catch it by that name where it is raised
  (the router, the publish API, the fleet log's replay); a wrapper would
  have to re-raise every check the shared validator makes.
- ``PublishError``/``PublishRefused`` (:mod:`smapws.publisher`) likewise belong
  to ``smapws_publisher``: a client's errors, re-exported as they are.

Messages are safe to log: no token, cookie or key. Causes are chained with
``raise X(...) from exc`` where the cause is safe to show too; where it may
hold a secret (PyJWT's errors, a control message carrying the Config, a
request head with its cookies) the chain is cut with ``from None`` and a
comment says why. Tests: tests/test_errors.py.
"""

from __future__ import annotations


class SmapwsError(Exception):
    """The root of every exception smapws defines. Its message is safe to
    log: it never holds a token, a cookie or a key."""
