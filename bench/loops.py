"""One training epoch of the seed workload, three ways, as runnable calls.

  stock-dataloader                  the seed's loop: TensorDataset + DataLoader(batch_size=64),
                                    batches moved to the device each step, nn.Linear model,
                                    MSELoss(reduction="sum"), torch.optim.SGD(lr=1e-4)
  stock-dataloader+compile-ro       the same loop with torch.compile(model, mode="reduce-overhead")
                                    (CUDA graphs on GPU; on CPU it is plain inductor)
  fastmlp                           fastmlp.fit + fastmlp.TensorLoader + fastmlp.SGD on the fused model
  fastmlp-parts                     the stock loop written by hand around fastmlp's parts
                                    (TensorLoader, fuse, fastmlp.SGD), no fit: what fit adds on top

All of them shuffle (a loop that never shuffles is not training); the data starts on the CPU, as in
the seed, where it came from numpy. Each timed call is one whole epoch; the first epoch (compile,
autotune, graph capture) is a warm-up and is reported separately as first_call_s.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastmlp
from bench.cases import Case
from bench.variants import SEED_LR, Runnable, reference_model

EPOCH_VARIANTS = ("fastmlp", "stock-dataloader", "stock-dataloader+compile-ro", "fastmlp-parts")


def epoch_data(case: Case):
    """The seed's dataset: x [samples, D_in], y [samples, D_out], float32 on the CPU."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(case.samples, case.dims[0], generator=gen)
    y = torch.randn(case.samples, case.dims[-1], generator=gen)
    return x, y


def build_epoch(case: Case, name: str, device: torch.device, data) -> Runnable:
    """One epoch of variant `name`; the Runnable's notes carry what ran."""
    x, y = data
    model = reference_model(case, device)
    loss_fn = nn.MSELoss(reduction="sum")
    last = {"loss": float("nan")}

    if name == "fastmlp":
        model = fastmlp.fuse(model)
        loader = fastmlp.TensorLoader(x, y, batch_size=case.batch, shuffle=True, device=device)
        optimizer = fastmlp.SGD(model.parameters(), lr=SEED_LR)

        def epoch():
            history = fastmlp.fit(model, loader, loss_fn, optimizer, epochs=1, cuda_graph="auto",
                                  progress=False)
            last["loss"] = history["loss"][-1]

        return Runnable(epoch, notes="fastmlp.fit(cuda_graph='auto') + TensorLoader + fuse + fastmlp.SGD; "
                                     "final_loss is fit's history['loss'][-1] (its per-epoch figure), "
                                     "the other loops report their last batch's loss",
                        output=lambda: torch.tensor(last["loss"]))

    if name == "fastmlp-parts":
        model = fastmlp.fuse(model)
        loader = fastmlp.TensorLoader(x, y, batch_size=case.batch, shuffle=True, device=device)
        optimizer = fastmlp.SGD(model.parameters(), lr=SEED_LR)
        notes = "hand-written loop: fastmlp.TensorLoader + fuse + fastmlp.SGD (no fit)"
    else:
        if name.endswith("+compile-ro"):
            torch._dynamo.reset()
            model = torch.compile(model, mode="reduce-overhead")
        elif name != "stock-dataloader":
            raise ValueError(f"unknown epoch variant {name!r}")
        loader = DataLoader(TensorDataset(x, y), batch_size=case.batch, shuffle=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=SEED_LR)
        notes = "DataLoader(TensorDataset, shuffle=True) + torch.optim.SGD"
        if name.endswith("+compile-ro"):
            notes += " + torch.compile(mode='reduce-overhead')"

    compiled = name.endswith("+compile-ro")

    def epoch():
        loss = None
        for inputs, labels in loader:
            if compiled:
                # reduce-overhead's documented per-iteration marker in a training loop
                torch.compiler.cudagraph_mark_step_begin()
            inputs, labels = inputs.to(device), labels.to(device)
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        last["loss"] = float(loss.detach()) if loss is not None else float("nan")

    return Runnable(epoch, notes=notes, output=lambda: torch.tensor(last["loss"]))


__all__ = ["EPOCH_VARIANTS", "build_epoch", "epoch_data"]
