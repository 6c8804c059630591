"""jizhictl, the control CLI (click): a thin client of jizhid's control socket and frontend.

One module per command family, over two shared ones:

  main       the click group ``cli``, ``run`` (logging, exit code 2 for a bad input) and ``main``
  reach      reaching jizhid: the control socket (``ask``), the frontend (``client``), exit codes 1, 2, 3,
             and ``control_command``: a control command's --help is its class docstring in the
             registry (jizhi.supervisor.commands), written once
  figures    the ``stats`` reply as tables and lines for people
  server     status, stats, scale, drain, resume, reload, models, pin, unpin, record
  top        the live view
  shed       shed status, auto, off, set
  frontend   info, query (the client protocol)
  cube       cube build, info, push, layout, get
  keys       keys init (CURVE)
  inputs     a request trace and a bundle named by any of its directories, as commands read them
  progress   the one-line progress bar on stderr

Layers: jizhi.ctl imports the runtime below it, never ``jizhi.tools``; the
tools add their commands (bench, demo, import, tune, shed train, cube bench)
to this group in ``jizhi.tools.commands``, which ``bin/jizhictl`` runs.
Start-up stays fast: numpy, zmq and the cube and bundle modules are imported
by the commands that use them. Nothing is imported here.
"""
