"""The long-running commands, one module each:

- :mod:`fqdnguard.daemons.run`: ``fqdnguard run``, data plane and control plane in one process;
- :mod:`fqdnguard.daemons.proxy`: ``fqdnguard proxy``, the data plane alone (state directory,
  control socket, hot restart);
- :mod:`fqdnguard.daemons.agent`: ``fqdnguard agent``, the control plane alone (files, or the
  Kubernetes API server), pushing to a proxy.
"""
