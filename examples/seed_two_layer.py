"""The seed's two-layer network trained by the stock torch loop and by fastmlp, side by side.

Seed workload (intro-to-pytorch): 64,000 samples, batch 64, Linear(1000, 100) -> ReLU ->
Linear(100, 10), MSELoss(reduction="sum"), SGD(lr=1e-4), DataLoader over in-memory tensors.

    python examples/seed_two_layer.py                  # 3 epochs each, CUDA if present
    python examples/seed_two_layer.py --epochs 5 --device cpu --threads 1

Both sides start from the same weights and see the same batches (no shuffle, as in the seed), so
they also end with the same weights: the script prints the largest relative difference.
Times are per epoch, wall clock, synchronised at the epoch's end; the ratio uses each side's best
epoch (the first epoch of each side includes one-time costs: compiles, graph capture).
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastmlp

N, D_IN, H, D_OUT = 64000, 1000, 100, 10
BATCH, LR = 64, 1e-4


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def stock_epochs(model, x, y, epochs, device):
    """The seed's loop: DataLoader(TensorDataset), torch.optim.SGD, zero_grad/backward/step."""
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    loss_fn = nn.MSELoss(reduction="sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    times = []
    for _ in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, loss.item()


def fastmlp_epochs(model, x, y, epochs, device, cuda_graph):
    """fuse + TensorLoader + fastmlp.SGD + fit."""
    model = fastmlp.fuse(model)
    loader = fastmlp.TensorLoader(x, y, batch_size=BATCH, device=device)
    loss_fn = nn.MSELoss(reduction="sum")
    optimizer = fastmlp.SGD(model.parameters(), lr=LR)
    times, losses = [], []
    for epoch in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        history = fastmlp.fit(model, loader, loss_fn, optimizer, epochs=1, start_epoch=epoch,
                              cuda_graph=cuda_graph, progress=False)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(history["loss"][-1])
    return times, losses[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=N)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-cuda-graph", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, D_IN, generator=gen)
    y = torch.randn(args.samples, D_OUT, generator=gen)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, D_OUT)).to(device)
    stock_model, fast_model = copy.deepcopy(base), copy.deepcopy(base)

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.samples} samples, batch {BATCH}, {D_IN}->{H}->{D_OUT}, {args.epochs} epochs")
    t_stock, loss_stock = stock_epochs(stock_model, x, y, args.epochs, device)
    print("stock   epochs (s): " + ", ".join(f"{t:.3f}" for t in t_stock) + f"   last batch loss {loss_stock:.4g}")
    t_fast, loss_fast = fastmlp_epochs(fast_model, x, y, args.epochs, device,
                                       cuda_graph=False if args.no_cuda_graph else "auto")
    print("fastmlp epochs (s): " + ", ".join(f"{t:.3f}" for t in t_fast) + f"   epoch mean loss {loss_fast:.4g}")

    diff = max(((a - b).norm() / b.norm()).item()
               for a, b in zip(fast_model.state_dict().values(), stock_model.state_dict().values()))
    best_s, best_f = min(t_stock), min(t_fast)
    print(f"best epoch: stock {best_s:.3f} s, fastmlp {best_f:.3f} s -> {best_s / best_f:.2f}x "
          f"(median {statistics.median(t_stock) / statistics.median(t_fast):.2f}x)")
    print(f"largest relative weight difference after training: {diff:.2e}")


if __name__ == "__main__":
    main()
