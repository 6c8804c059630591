"""The supervisor: jizhid's main process (the arbiter) and what it manages, one module per concept.

==============  ==============================================================================
module          holds
==============  ==============================================================================
arbiter         ``Supervisor``: the start, the loop of a few verbs (signals, reap, murder,
                converge models, manage, serve control, hand to load control), the stop
children        ``Child`` (the broker or a worker, by name), how a child ended, restart backoff
                and budget, the spawner
boot            the run-wide segments a start creates (overlay, query cache, stats)
pools           desired pool sizes and who set them (config, jizhictl scale, the autoscaler)
versions        the version manager: converge_models, load, warm, activate, fail, unload, reload
loader          ``Loader``: one version set loaded in one bank, and its state table
registry        the model directory as a source: version records and their state table
hot             hot tiers: first builds, LFU rebuilds, disk-cache managers
loadcontrol     shedding's controller glue and the autoscalers, fed by the broker's figures
autoscale       ``Autoscaler``: moves workers to the kind that is the bottleneck
reports         readiness, status, stats, cube figures, the boot timeline
metrics         the Prometheus endpoint and the health probes (a thread)
commands/       the control commands, one module each, registered in ``COMMANDS``
==============  ==============================================================================

jizhid's command line is jizhi/daemon.py. Everything here runs in the
supervisor process, except ``commands``, whose docstrings jizhictl reads as
its help: this file and that package import nothing heavy (no numpy, onnx,
numba or zmq).
"""
