"""The broker process: admission, dispatch to the stage workers, replies (``python -m jizhi.broker``).

One module per concept; this file imports none of them (``import jizhi.broker``
stays light):

=============  ==================================================================
loop           the process: its two sockets, the poll loop, the stop, ``main``
core           ``Broker``: the state, the table of handlers per message type, the
               timers; no socket (a unit test steps it: tests/test_broker_steps.py)
admission      client messages, limits, ``RetryHints``, the deadline, recording
dispatch       ``PipelineState``, channels, order (critical path), batching, credit
answers        replies ok and error, invalid scores, the release of a slot
roster         the workers: ready, done, heartbeat, retire, leaving, dead, drop
versions       ``Generation`` and its states; warm-up, activate, fail, drop, routes
figures        ``GroupStats``, ``RequestStats``, the ``info`` and ``load`` answers
connections    client connections: their limit and the memory guard (a thread)
=============  ==================================================================

The internal messages are jizhi/messages.py's, the client protocol
jizhi/protocol.py's. Logs go to the logger ``jizhi.broker``.
"""
