"""The vetted ClientApp: one DP-SGD round at a node.

A node never imports this file from a FAB it received: its executor checks the FAB's
sha256 against the FAB built from the code its operator installed, then runs the
*installed* copy of this app (``nodes/_flower.py``). The work itself is in
``nodes._training``, which builds the training view on the node's locked data, trains
with Opacus, charges the node's ledger and only then returns the weights.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from nodes import train_round  # installed with the node agent

    return train_round(msg, context)
