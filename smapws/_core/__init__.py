"""Sans-IO core of smapws: no trio, no sockets, no clock reads.

Everything here is plain functions and small state machines. Time comes in as a
``now`` argument so that the trio shell (``smapws._io``) decides which clock is
used and tests can pass any value they like.
"""
