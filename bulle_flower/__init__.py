"""Bulle's Flower app: DP federated training of vetted models (the FAB's content).

- ``spec``: ``TrainSpec``, the run's spec: one frozen type the coordinator builds and
  signs, the ServerApp and the nodes rebuild (``from_dict``/``to_dict``, checked once);
- ``models``: the model zoo (logistic regression, MLP, GRU over learning traces);
- ``server_app``: the ServerApp (FedAvg, rounds, progress files for the coordinator);
- ``client_app``: the ClientApp entry (work in ``nodes._training``, at the node);
- ``_fab``: the deterministic FAB of this package and its sha256.
"""
