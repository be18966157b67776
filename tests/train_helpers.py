"""What the fit tests share: small models and data, the seed's stock loop, a weight comparison."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def seed_like(d_in=40, h=24, d_out=6, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, d_out)).to(device)


def regression_data(n=200, d_in=40, d_out=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def stock_loop(model, x, y, loss_fn, optimizer, epochs, batch_size):
    """The seed's loop, with each batch's loss recorded; the per-epoch mean losses."""
    losses = []
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    for _ in range(epochs):
        epoch_losses = []
        for inputs, labels in loader:
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
        losses.append(sum(epoch_losses) / len(epoch_losses))
    return losses


def max_rel_err(model_a, model_b):
    return max(((a - b).norm() / b.norm()).item()
               for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
