"""The demo federation on one machine (``bulle demo …``, ``make demo``): six node agents
on real open data, the coordinator with its Flower SuperLink, and JupyterHub. It uses the
other packages only through their public APIs and the coordinator only through its CLI and
HTTP API (never its database).

Where things are:
- ``_layout``: what the demo is made of (``NODES``, accounts, ports), the node configs
  shipped as package data (``nodes/*.toml``, ``node_config``), keys, certificates, the
  board's grant and the coordinator's config (``templates/coordinator.toml``);
- ``_procs``: processes started detached, the pid file, waiting, stopping a process tree;
- ``_hosts``: as root, the service users and who owns which file;
- ``_seed``: the pending project and the standing indicator, through the SDK and
  ``bulle board approve`` (``INDICATOR``);
- ``_launcher``: ``Demo`` (``up``, ``down``, ``add_node``, ``env_lines``, ``running``);
- ``cli``: ``bulle demo up|down|env|status|add-node``.
"""

from bulle_demo._launcher import Demo
from bulle_demo._layout import EXAMPLE, NODES, RESEARCHER, TRAINING_NODES, node_config
from bulle_demo._seed import INDICATOR

__all__ = ["EXAMPLE", "INDICATOR", "NODES", "RESEARCHER", "TRAINING_NODES", "Demo",
           "node_config"]
