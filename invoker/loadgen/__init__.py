"""``invoker loadgen``: drive a running invoker with activations and check that none was lost.

One run:

1. counts the records already in the store (for the duplicate check);
2. makes sure the feed and completions topics exist, assigns every partition of the completions
   topic to a group-less consumer and seeks it to the current end, so only completions
   published from now on are seen; a thread consumes them while the run produces;
3. produces activation messages (keyed by activation id, ``acks="all"``, partitions in turn) at
   ``rate`` per second or as fast as possible, for ``count`` messages or ``duration_s``
   seconds, cycling through ``actions`` round-robin (list a spec several times to weight it)
   and, with ``copies`` > 1, through that many distinct copies of each action;
4. waits up to ``completion_timeout_s`` (counted from the end of producing) for a completion of
   every produced activation — the daemon publishes a completion only once the record is
   durably stored, so produce → completion is produce → stored;
5. reads every produced id back from the store (``get_many``), counts the store again, reads
   the daemons' ``/metrics`` and returns a :class:`Report`.

The daemons' ``/metrics`` are read at the start and at the end (before the completions
consumer of step 2 is made, and in step 5): every replica behind each metrics URL, as its host
resolves each time, so a scaled run reports each daemon and the combined figures
(:mod:`~invoker.loadgen.daemon_metrics`). With ``plot``, they are also sampled every 0.5 s
during steps 3-4 and the run is drawn over time (:mod:`~invoker.loadgen.sampler`,
:mod:`~invoker.loadgen.plot`).

All activations of a run use one namespace (``loadgen-<random hex>`` unless given) so the
checks only ever look at this run's records. Every wait is bounded by a timeout.

Action specs (``ACTIONS``; all ``python:3`` actions with inline code):

========== ==================================================================================
echo       returns its params
noop       returns ``{}``
sleep:MS   sleeps MS milliseconds (default 100)
cpu:MS     burns CPU in a busy loop for MS milliseconds of wall time (default 100)
error      returns ``{"error": ...}``: an *application error*
raise      raises: an *action developer error*
logs:N     prints N lines to stdout (default 10)
big:KB     returns ``{"data": "xxx..."}`` of KB KiB once JSON-encoded (default 64)
========== ==================================================================================

When no explicit limits are given, ``sleep``/``cpu`` ask for a timeout long enough to finish
and ``logs`` for a logs limit large enough to keep every line, but only when the daemon's
defaults (60 s, 10 KB) would not do; otherwise the message carries no limits at all.

Modules: :mod:`~invoker.loadgen.actions` (templates, specs, messages), ``spec`` (LoadSpec),
``clients`` (Kafka settings), ``produce``, ``collect`` (completions), ``check`` (the store:
lost and duplicates), ``daemon_metrics``, ``sampler`` and ``plot`` (``--plot``), ``report``
(Report, percentiles, progress), ``run`` (:func:`run_load`) and ``cli`` (``invoker loadgen``).
This package re-exports what other code uses.
"""

from invoker.loadgen.actions import (
    ACTION_VERSION,
    ACTIONS,
    KIND,
    MAX_COPIES,
    ActionTemplate,
    MessageEncoder,
    ParsedAction,
    action_spec_help,
    activation_message,
    check_namespace,
    message_encoders,
    parse_action_spec,
)
from invoker.loadgen.check import STORE_CHUNK, STORE_TIMEOUT_S, store_session
from invoker.loadgen.cli import add_parser, spec_from_args
from invoker.loadgen.collect import read_completions
from invoker.loadgen.daemon_metrics import combine_metrics, parse_metrics
from invoker.loadgen.produce import TokenBucket, produce_messages
from invoker.loadgen.report import DaemonFigures, Report, percentile, progress_line
from invoker.loadgen.run import run_load
from invoker.loadgen.spec import LoadgenError, LoadSpec

__all__ = [
    "ACTIONS", "ACTION_VERSION", "KIND", "MAX_COPIES", "STORE_CHUNK", "STORE_TIMEOUT_S",
    "ActionTemplate", "DaemonFigures", "LoadSpec", "LoadgenError", "MessageEncoder",
    "ParsedAction", "Report",
    "TokenBucket", "action_spec_help", "activation_message", "add_parser", "check_namespace",
    "combine_metrics", "message_encoders", "parse_action_spec", "parse_metrics", "percentile",
    "produce_messages", "progress_line", "read_completions", "run_load", "spec_from_args",
    "store_session",
]
