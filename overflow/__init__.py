"""Overflow of activation records to Kafka, and the recorder that drains them into the store.

With overflow on, a finished activation whose record the bounded record channel cannot take
(within ``overflow_wait_ms``) is produced to the overflow topic instead; its slot is held until
Kafka acknowledged the write. ``invoker recorder`` consumes that topic in a consumer group and
stores the records through the same batcher and store backends as the invoker.
"""
