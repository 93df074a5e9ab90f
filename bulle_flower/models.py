"""The vetted model zoo: the only architectures a node will train.

Every model maps a float tensor of features to one logit (binary label). Inputs are the
training view built at the node, one example per learner: ``[batch, n_features]`` for the
tabular models (one row of the learner, or — with an order — the mean of the learner's
earlier rows next to the last row), ``[batch, max_len, n_features]`` (left-padded with
zeros) for the sequence model.
The GRU is Opacus' ``DPGRU`` (per-sample gradients need it); its state dict can be
loaded into ``torch.nn.GRU`` for inference (``to_inference_state``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bulle_flower.spec import MODELS  # the zoo's names (no torch import there)


class LogReg(nn.Module):
    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_features, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x))).squeeze(-1)


class GRUClassifier(nn.Module):
    """One GRU layer over the learner's trace, the last hidden state → one logit."""

    def __init__(self, n_features: int, hidden: int, dp: bool = True) -> None:
        super().__init__()
        if dp:  # imported here: opacus is only needed where the model is trained
            from opacus.layers import DPGRU

            self.gru: nn.Module = DPGRU(n_features, hidden, batch_first=True)
        else:
            self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.gru(x)
        return self.out(seq[:, -1, :]).squeeze(-1)


def build_model(kind: str, n_features: int, hidden: int = 32, dp: bool = True) -> nn.Module:
    """A freshly initialised model of the zoo (seeded by the caller for reproducibility)."""
    if kind == "logreg":
        return LogReg(n_features)
    if kind == "mlp":
        return MLP(n_features, hidden)
    if kind == "gru":
        return GRUClassifier(n_features, hidden, dp=dp)
    raise ValueError(f"unknown model {kind!r} (the zoo has {', '.join(MODELS)})")


def strip_opacus_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Opacus wraps the model: its state_dict keys start with ``_module.`` (TRAPS.md)."""
    return {k.removeprefix("_module."): v for k, v in state.items()}


def pack(state: dict[str, Any], template: dict[str, Any]) -> Any:
    """All weights as one float32 vector, in the template's key order. One array per
    message instead of one per tensor: every array is a separate object upload and
    download through the SuperLink (each an HTTPS request)."""
    import numpy as np

    return np.concatenate([np.asarray(state[k], dtype=np.float32).ravel() for k in template])


def unpack(flat: Any, template: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``pack``: tensors shaped like the template's."""
    out, at = {}, 0
    for k, v in template.items():
        n = int(v.numel())
        if at + n > len(flat):
            raise ValueError("the packed weights are shorter than the model")
        out[k] = torch.from_numpy(flat[at:at + n].copy()).reshape(v.shape)
        at += n
    if at != len(flat):
        raise ValueError("the packed weights are longer than the model")
    return out
