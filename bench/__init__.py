"""``python -m bench``: benchmarks of the invoker on the real components.

Scenarios (``--only`` names):

- ``e2e-sqlite``, ``e2e-couchdb``: end-to-end throughput of a no-op action through a daemon
  subprocess, the store's own bulk-insert rate with records of the same shape, their ratio, and
  the invoker-added latency (produce → completion minus the action's run time);
- ``coldstart``: cold and warm start times with :class:`invoker.containers.pool.ContainerPool`
  directly;
- ``memory``: the same load against a slow store (fault proxy in front of pouchdb-server) for
  the bounded daemon and for the same daemon configured like OpenWhisk (unbounded), with RSS
  sampled over a fixed window.

See bench/README.md.
"""
