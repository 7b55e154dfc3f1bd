"""smapws benchmark suite: baseline hub, load generator, publisher and runner.

Run ``python -m bench.run`` (see ``bench/README.rst``). Nothing here is imported by the
hub itself; the suite only needs the hub's own dependencies (``redis``, ``PyJWT``),
with ``psutil`` and ``matplotlib`` as optional extras (``bench/requirements.txt``).
"""
