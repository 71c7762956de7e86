"""The tunable LSTM: nn.LSTM (cuDNN on CUDA) and a linear head on the last hidden state."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelArgs:
    n_features: int
    hidden_size: int
    num_layers: int
    dropout: float
    bidirectional: bool
    head_dropout: float
    out_dim: int
    init: str = "default"

    def to_dict(self) -> dict:
        return asdict(self)


class LSTMModel(nn.Module):
    """(batch, seq_len, n_features) → (batch, out_dim).

    The input stays unpacked (no pack_padded_sequence) so cuDNN keeps its fast kernels.
    """

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.args = a
        self.lstm = nn.LSTM(
            a.n_features,
            a.hidden_size,
            num_layers=a.num_layers,
            dropout=a.dropout if a.num_layers > 1 else 0.0,
            bidirectional=a.bidirectional,
            batch_first=True,
        )
        self.dirs = 2 if a.bidirectional else 1
        self.head_dropout = nn.Dropout(a.head_dropout)
        self.head = nn.Linear(a.hidden_size * self.dirs, a.out_dim)
        self._init(a.init)

    def _init(self, scheme: str) -> None:
        if scheme == "default":
            return
        for name, p in self.lstm.named_parameters():
            if name.startswith("weight"):
                if scheme == "xavier":
                    nn.init.xavier_uniform_(p)
                else:
                    for gate in p.chunk(4, dim=0):  # one orthogonal block per gate
                        nn.init.orthogonal_(gate)
            else:
                nn.init.zeros_(p)
                if name.startswith("bias_ih"):  # forget-gate bias 1: remember by default
                    p.data[self.lstm.hidden_size : 2 * self.lstm.hidden_size] = 1.0
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)
        last = h[-self.dirs :].transpose(0, 1).reshape(x.shape[0], -1)  # top layer, all dirs
        return self.head(self.head_dropout(last))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
