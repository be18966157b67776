"""The seed's two-layer network trained by the stock torch loop and by fastmlp, side by side.

Seed workload (intro-to-pytorch): 64,000 samples, batch 64, Linear(1000, 100) -> ReLU ->
Linear(100, 10), MSELoss(reduction="sum"), SGD(lr=1e-4), DataLoader over in-memory tensors.

    python examples/seed_two_layer.py                  # 3 epochs each, CUDA if present
    python examples/seed_two_layer.py --epochs 5 --device cpu --threads 1

Both sides start from the same weights and see the same batches (no shuffle, as in the seed), so
they also end with the same weights: the script prints the largest relative difference.
Times are per epoch, wall clock, synchronised at the epoch's end. The two loops alternate epoch
by epoch; the headline is the median over epoch pairs of stock time / fastmlp time, leaving out
the first pair (one-time costs: compiles, graph capture).
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


class StockLoop:
    """The seed's loop: DataLoader(TensorDataset), torch.optim.SGD, zero_grad/backward/step."""

    def __init__(self, model, x, y, device):
        self.model, self.device = model, device
        self.loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
        self.loss_fn = nn.MSELoss(reduction="sum")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        self.loss = float("nan")

    def epoch(self):
        for inputs, labels in self.loader:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            loss = self.loss_fn(self.model(inputs), labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.loss = loss.item()   # the last batch's loss


class FastmlpLoop:
    """fuse + TensorLoader + fastmlp.SGD + fit."""

    def __init__(self, model, x, y, device, cuda_graph):
        self.model = fastmlp.fuse(model)
        self.loader = fastmlp.TensorLoader(x, y, batch_size=BATCH, device=device)
        self.loss_fn = nn.MSELoss(reduction="sum")
        self.optimizer = fastmlp.SGD(self.model.parameters(), lr=LR)
        self.cuda_graph, self.epochs_done = cuda_graph, 0
        self.loss = float("nan")

    def epoch(self):
        history = fastmlp.fit(self.model, self.loader, self.loss_fn, self.optimizer, epochs=1,
                              start_epoch=self.epochs_done, cuda_graph=self.cuda_graph,
                              progress=False)
        self.epochs_done += 1
        self.loss = history["loss"][-1]   # fit's figure: the epoch's mean batch loss


def timed_epoch(loop, device):
    sync(device)
    t0 = time.perf_counter()
    loop.epoch()
    sync(device)
    return time.perf_counter() - t0


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
    stock = StockLoop(stock_model, x, y, device)
    fast = FastmlpLoop(fast_model, x, y, device,
                       cuda_graph=False if args.no_cuda_graph else "auto")
    # The two loops take turns, epoch by epoch: a shared machine's speed drifts over seconds
    # (this CPU VM's loops ran at two speeds ~1.5x apart, switching mid-run), and a drift then
    # slows both sides of a pair alike instead of one side's whole run.
    t_stock, t_fast = [], []
    for _ in range(args.epochs):
        t_stock.append(timed_epoch(stock, device))
        t_fast.append(timed_epoch(fast, device))
    print("stock   epochs (s): " + ", ".join(f"{t:.3f}" for t in t_stock)
          + f"   last batch loss {stock.loss:.4g}")
    print("fastmlp epochs (s): " + ", ".join(f"{t:.3f}" for t in t_fast)
          + f"   epoch mean loss {fast.loss:.4g}")

    diff = max(((a - b).norm() / b.norm()).item()
               for a, b in zip(fast.model.state_dict().values(), stock.model.state_dict().values()))
    # The first pair includes one-time costs (compiles, graph capture): ratios use the others.
    pairs = [s / f for s, f in zip(t_stock[1:], t_fast[1:])] or [t_stock[0] / t_fast[0]]
    best_s, best_f = min(t_stock), min(t_fast)
    print("stock / fastmlp per epoch pair: " + ", ".join(f"{r:.2f}x" for r in pairs)
          + f"  -> median {statistics.median(pairs):.2f}x")
    print(f"best epochs: stock {best_s:.3f} s, fastmlp {best_f:.3f} s -> {best_s / best_f:.2f}x")
    print(f"largest relative weight difference after training: {diff:.2e}")


if __name__ == "__main__":
    main()
