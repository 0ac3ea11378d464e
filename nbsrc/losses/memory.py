"""Cross-batch memory (XBM; Wang et al., 2020), as IRT uses it with the contrastive loss.

A FIFO ring buffer of detached embeddings, labels and dataset indices. The loss of a batch is
taken over batch × batch plus batch × memory (the memory as it was *before* this batch is
enqueued), so a sample never meets itself; older copies of the same image are masked by index.
"""

from __future__ import annotations

import torch


class CrossBatchMemory:
    def __init__(self, size: int, feature_dim: int, device: torch.device | str = "cpu"):
        self.size, self.feature_dim = size, feature_dim
        self.embeddings = torch.zeros(size, feature_dim, device=device)
        self.labels = torch.zeros(size, dtype=torch.long, device=device)
        self.indices = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0  # next slot to write
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    def get(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored embeddings, labels and indices, oldest first."""
        if self.filled < self.size:
            sl = slice(0, self.filled)
            return self.embeddings[sl], self.labels[sl], self.indices[sl]
        order = torch.arange(self.ptr, self.ptr + self.size, device=self.embeddings.device) % self.size
        return self.embeddings[order], self.labels[order], self.indices[order]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Append a batch (in order), overwriting the oldest entries when full."""
        embeddings = embeddings.detach().to(self.embeddings)
        n = len(embeddings)
        if n >= self.size:  # only the newest `size` fit
            embeddings, labels, indices = embeddings[-self.size:], labels[-self.size:], indices[-self.size:]
            n = self.size
        slots = (torch.arange(n, device=self.embeddings.device) + self.ptr) % self.size
        self.embeddings[slots] = embeddings
        self.labels[slots] = labels.to(self.labels)
        self.indices[slots] = indices.to(self.indices)
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.cpu(), "labels": self.labels.cpu(), "indices": self.indices.cpu(),
                "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        dev = self.embeddings.device
        self.embeddings = state["embeddings"].to(dev)
        self.labels = state["labels"].to(dev)
        self.indices = state["indices"].to(dev)
        self.size, self.feature_dim = self.embeddings.shape
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
