"""The exceptions smapws raises, as one tree.

Every exception smapws defines derives from :class:`SmapwsError`, so a caller
can catch "anything the hub decided to refuse or report" in one clause, and
trio's and the standard library's own exceptions stay distinguishable from it.
(The tree is drawn here; issue 17 moves every class under it.)
"""

from __future__ import annotations


class SmapwsError(Exception):
    """The root of every exception smapws defines. Its message is safe to
    log: it never holds a token, a cookie or a key."""
