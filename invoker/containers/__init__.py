"""Action containers: which slot serves an activation, and everything done with a container.

- :mod:`~invoker.containers.scheduler`: the pure decisions (no Docker, no I/O): free slots,
  stem cells, waiting, new containers, evictions, memory accounting;
- :mod:`~invoker.containers.pool`: the pool and its leases: container lifecycle (create,
  ``/init``, ``/run``, retire, remove), leftovers, prewarming, the idle reaper;
- :mod:`~invoker.containers.runtime`: the OpenWhisk action protocol over one keep-alive HTTP/1.1
  connection per container slot, and how an answer becomes a status and result;
- :mod:`~invoker.containers.logs`: an activation's logs from the container's json-file log;
- :mod:`~invoker.containers.engine`: the Docker SDK behind worker threads (and the Docker API
  log reader, used where the log files cannot be read).
"""
