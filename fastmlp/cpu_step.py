"""fit's step on CPU for plain MLPs: forward + loss + backward as aten ops, without autograd.

Contract with fit (fastmlp/train.py), the same for every step strategy:

* ``CPUStep.build(model, loss_fn, optimizer, fallback)`` -> a CPUStep, or None when the model or
  loss is not one it computes exactly as autograd would (fit then uses ``fallback`` alone);
* ``start_epoch()`` before an epoch's first batch: between epochs callbacks may have changed the
  parameters or the optimizer, so what the steps rely on is looked up again there;
* ``step(inputs, target)`` trains on one batch and returns its loss (0-dim, no autograd graph);
  a batch it does not take (another dtype, inputs that require grad, autocast on, ...) goes to
  ``fallback``, the autograd step;
* ``take_loss_sum()`` -> None: every loss is returned by ``step``.

Why. On a CPU, a seed-sized step (64x1000 -> 100 -> 10) computes for a fraction of a millisecond, and
the autograd engine, module calls and custom-op dispatch around it cost about as much again. For the
models this project is about, an ``nn.Sequential`` of nn.Linear / FusedLinear / FusedLinearReLU,
each optionally followed by an activation module, trained with MSELoss or CrossEntropyLoss, the
backward is a fixed sequence of a few matrix products and one activation backward per layer, so
the step runs that sequence directly: the forward ops the modules run (addmm, then the
activation's torch op from fastmlp.activations), the backward ops autograd runs
(mse_loss_backward, or nll_loss_backward + _log_softmax_backward_data; the activation's own
backward op with the tensor it saves; mm; sum), the gradients stored in ``p.grad`` as autograd
stores them.
"""

from typing import Optional

import torch
from torch import nn

from fastmlp import activations as _activations
from fastmlp.hooks import global_module_hook, hook_name as _hook_name

__all__ = ["CPUStep", "ManualMLP", "python_hooks"]

_REDUCTIONS = {"mean": 1, "sum": 2}  # at::Reduction, as the aten loss ops take it
_aten = torch.ops.aten

# torch.nn.functional.mse_loss's kernel without its Python-side checks (broadcast warning,
# reduction-string parsing): accepts() has already made sure the shapes are equal.
_mse_loss = torch._C._nn.mse_loss


# --------------------------------------------------------------------------------------------
# Activations, as the step applies them
# --------------------------------------------------------------------------------------------
class _ReLU:
    """relu in place on the fresh addmm output (nothing else holds it), and its backward from
    the output, as torch's relu saves it: the same values as the table's relu, one tensor fewer."""

    name = "relu"

    @staticmethod
    def forward(z):
        return torch.relu_(z)

    @staticmethod
    def backward(grad, z, y):
        return _aten.threshold_backward(grad, y, 0)


class _TableActivation:
    """Any other row of fastmlp.activations: its torch forward (out of place), and its torch
    backward op given the tensor the row says it saves."""

    def __init__(self, row, alpha: float):
        self.name = row.name
        self.row, self.alpha = row, float(alpha)
        self.saves = row.saves(self.alpha)

    def forward(self, z):
        return self.row.torch_forward(z, self.alpha)

    def backward(self, grad, z, y):
        saved = y if self.saves == "output" else z if self.saves == "preact" else None
        return self.row.torch_backward(grad, saved, self.alpha)


_RELU = _ReLU()
_DECLINE = object()   # an activation the step does not compute: the model takes autograd


def _activation(name: str, alpha: float):
    """None (no activation), the step's activation for (name, alpha), or _DECLINE."""
    if name == "none":
        return None
    if name == "relu":
        return _RELU
    try:
        row = _activations.get(name)
    except ValueError:
        return _DECLINE
    return _TableActivation(row, alpha)


def _module_activation(module: nn.Module):
    """The activation an nn module applies (exact torch types only), or _DECLINE."""
    if type(module) is nn.ReLU:
        return _RELU
    found = _activations.from_module(module)
    return _DECLINE if found is None else _activation(*found)


# --------------------------------------------------------------------------------------------
# Python hooks a step would run
# --------------------------------------------------------------------------------------------
_MODULE_HOOKS = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
)


def python_hooks(model: nn.Module, loss_fn=None, optimizer=None) -> Optional[str]:
    """The first Python hook one training step of `model` would run, described, or None.

    For the two steps that do not run that Python as autograd and Optimizer.step would: the
    CPU step computes the backward with aten ops (module and tensor hooks would not fire; it
    takes autograd instead), and a CUDA graph replay runs no Python at all (a hook would run
    once, at capture, never on the replays; fit trains eagerly instead). Looked at: torch's
    global module hooks, every module's forward/backward (pre-)hooks (the loss module's too),
    every parameter's gradient and post-accumulate-grad hooks (the model's and the optimizer's
    parameters), and with `optimizer` its step pre/post hooks and torch's global ones.
    """
    global_hook = global_module_hook()
    if global_hook is not None:
        return global_hook
    modules = [("the model" if not name else f"submodule '{name}'", m)
               for name, m in model.named_modules()]
    if isinstance(loss_fn, nn.Module):
        modules.append(("the loss module", loss_fn))
    for where, m in modules:
        for attr, what in _MODULE_HOOKS:
            hooks = getattr(m, attr, None)
            if hooks:
                return f"a {what} on {where} ({type(m).__name__}): {_hook_name(hooks)}"
    params = dict(model.named_parameters())
    if optimizer is not None:
        seen = {id(p) for p in params.values()}
        for gi, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if id(p) not in seen:
                    params[f"{i} of optimizer param group {gi}"] = p
    for name, p in params.items():
        if p._backward_hooks:
            return (f"a gradient hook (register_hook) on parameter {name}: "
                    f"{_hook_name(p._backward_hooks)}")
        hooks = getattr(p, "_post_accumulate_grad_hooks", None)
        if hooks:
            return (f"a post-accumulate-grad hook (register_post_accumulate_grad_hook) on "
                    f"parameter {name}: {_hook_name(hooks)}")
    if optimizer is not None:
        from torch.optim import optimizer as torch_optimizer

        for hooks, what in (
                (getattr(optimizer, "_optimizer_step_pre_hooks", None), "step pre-hook"),
                (getattr(optimizer, "_optimizer_step_post_hooks", None), "step post-hook"),
                (torch_optimizer._global_optimizer_pre_hooks,
                 "global step pre-hook (register_optimizer_step_pre_hook)"),
                (torch_optimizer._global_optimizer_post_hooks,
                 "global step post-hook (register_optimizer_step_post_hook)")):
            if hooks:
                return f"an optimizer {what} on {type(optimizer).__name__}: {_hook_name(hooks)}"
    return None


# --------------------------------------------------------------------------------------------
# forward + loss + backward without autograd
# --------------------------------------------------------------------------------------------
class ManualMLP:
    """One step's forward, loss and backward of a recognised MLP (see the module docstring).

    Anything else takes autograd: other modules or losses, an activation module not directly
    after a Linear or a second activation on a layer (relu twice excepted: same values, same
    mask), any module/parameter hook (global ones too), autocast, parameters of mixed dtypes,
    non-2-D inputs, fastmlp's backend forced to "triton".
    """

    def __init__(self, layers, loss_fn):
        self.layers = layers          # [(weight, bias or None, activation or None)]
        self.loss_fn = loss_fn
        self.dtype = layers[0][0].dtype
        self.ce = isinstance(loss_fn, nn.CrossEntropyLoss)
        self.reduction = _REDUCTIONS[loss_fn.reduction]
        self.one = torch.ones((), dtype=self.dtype)
        self.params = [t for w, b, _ in layers for t in (w, b) if t is not None]
        self.views = None   # see prepare()

    @classmethod
    def build(cls, model, loss_fn) -> Optional["ManualMLP"]:
        from fastmlp import backend
        from fastmlp.nn import FusedLinear, FusedLinearReLU

        if type(model) is not nn.Sequential or backend.get_backend() == "triton":
            return None
        if type(loss_fn) is nn.MSELoss:
            if loss_fn.reduction not in _REDUCTIONS:
                return None
        elif type(loss_fn) is nn.CrossEntropyLoss:
            if loss_fn.weight is not None or loss_fn.label_smoothing != 0 or \
                    loss_fn.reduction not in _REDUCTIONS:
                return None
        else:
            return None
        if python_hooks(model, loss_fn) is not None:
            return None   # the manual backward would not run it
        layers = []
        for m in model.children():
            t = type(m)
            if t in (nn.Linear, FusedLinear, FusedLinearReLU):
                act = None
                if t is not nn.Linear:
                    act = _activation(getattr(m, "activation", "none"),
                                      getattr(m, "activation_alpha", 0.0))
                if act is _DECLINE:
                    return None
                layers.append([m.weight, m.bias, act])
            elif t is nn.Identity:
                continue
            else:
                act = _module_activation(m)
                if act is _DECLINE or not layers:
                    return None
                previous = layers[-1][2]
                if previous is not None and not (previous is _RELU and act is _RELU):
                    return None
                layers[-1][2] = act
        if not layers:
            return None
        params = [t for w, b, _ in layers for t in (w, b) if t is not None]
        if any(p.device.type != "cpu" or p.dtype != params[0].dtype or not p.requires_grad
               or not p.is_floating_point() for p in params):
            return None
        return cls([tuple(layer) for layer in layers], loss_fn)

    def accepts(self, inputs, target) -> bool:
        if len(inputs) != 1 or torch.is_autocast_enabled("cpu") or not torch.is_grad_enabled():
            return False
        x = inputs[0]
        if x.dim() != 2 or x.dtype != self.dtype or x.device.type != "cpu" or x.requires_grad \
                or target.requires_grad:
            return False
        if self.ce:
            return target.dim() == 1 and target.dtype == torch.int64
        return target.shape == (x.shape[0], self.layers[-1][0].shape[0]) and \
            target.dtype == self.dtype

    def prepare(self, own_grads: bool) -> None:
        """Get ready for an epoch of steps (CPUStep.start_epoch calls this).

        Detached views of the weights (and of their transposes), with the parameters they
        belong to and the activation that follows: the ops on the views record no autograd
        graph without a grad-mode switch per step, and the views share the parameters' storage,
        so every update shows through. Made per epoch, since in between a callback may have
        swapped a parameter's .data.

        own_grads: the steps will run with replace_grads=True. The current gradients are
        dropped (zero_grad(set_to_none=True), which the first step would amount to anyway),
        so that the ones the steps allocate belong to this epoch alone, and later steps
        overwrite them in place: reusing the same memory each step is faster than a fresh
        allocation, and no tensor the caller holds gets overwritten.
        """
        self.views = [(w.detach(), w.detach().t(), None if b is None else b.detach(), act, w, b)
                      for w, b, act in self.layers]
        if own_grads:
            for p in self.params:
                p.grad = None

    def __call__(self, x, target, replace_grads=False):
        """One step's loss (a 0-dim tensor); the gradients land in the parameters' .grad.

        replace_grads: store them over whatever .grad holds, as zero_grad(set_to_none=True)
        followed by autograd would (CPUStep says so when the optimizer owns exactly these
        parameters); otherwise accumulate like autograd does.
        """
        acts = [x]     # each layer's input, then the model's output
        preacts = []   # each layer's pre-activation (the same tensor as its output for relu)
        h = x
        for _, w_t, b, act, _, _ in self.views:
            z = torch.addmm(b, h, w_t) if b is not None else h.mm(w_t)
            h = z if act is None else act.forward(z)
            preacts.append(z)
            acts.append(h)
        if self.ce:
            lsm = torch.log_softmax(h, 1)
            loss, total_weight = _aten.nll_loss_forward(lsm, target, None, self.reduction,
                                                        self.loss_fn.ignore_index)
            g = _aten.nll_loss_backward(self.one, lsm, target, None, self.reduction,
                                        self.loss_fn.ignore_index, total_weight)
            g = _aten._log_softmax_backward_data(g, lsm, 1, self.dtype)
        else:
            loss = _mse_loss(h, target, self.reduction)
            g = _aten.mse_loss_backward(self.one, h, target, self.reduction)
        i = len(self.views)
        for w, _, _, act, w_param, b_param in reversed(self.views):
            i -= 1
            if act is not None:
                g = act.backward(g, preacts[i], acts[i + 1])
            g_t = g.t()
            if not replace_grads:
                _accumulate(w_param, g_t.mm(acts[i]))
                if b_param is not None:
                    _accumulate(b_param, g.sum(0))
            else:
                # After an epoch's first step the gradients are this epoch's own (prepare):
                # write them in place.
                grad = w_param.grad
                if grad is None:
                    w_param.grad = g_t.mm(acts[i])
                else:
                    torch.mm(g_t, acts[i], out=grad)
                if b_param is not None:
                    grad = b_param.grad
                    if grad is None:
                        b_param.grad = g.sum(0)
                    else:
                        torch.sum(g, 0, out=grad)
            if i > 0:
                g = g.mm(w)
        return loss


def _accumulate(param, grad):
    """Store a gradient the way autograd's AccumulateGrad does: set it, or add to an existing one."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


# --------------------------------------------------------------------------------------------
# The step strategy
# --------------------------------------------------------------------------------------------
class CPUStep:
    """ManualMLP's forward/backward, then the optimizer's update (see the module docstring).

    With a fastmlp.SGD that owns exactly the model's parameters (``SGD._cpu_step_plan``), the
    update also skips ``Optimizer.step``'s per-call machinery, and each step writes its
    gradients into the previous step's buffers; otherwise ``zero_grad(set_to_none=True)``,
    the manual backward, ``optimizer.step()``.
    """

    def __init__(self, mlp: ManualMLP, optimizer, fallback):
        self.mlp, self.optimizer, self.fallback = mlp, optimizer, fallback
        self.lean = None   # the optimizer's own step without its per-call costs; per epoch

    @classmethod
    def build(cls, model, loss_fn, optimizer, fallback) -> Optional["CPUStep"]:
        mlp = ManualMLP.build(model, loss_fn)
        return None if mlp is None else cls(mlp, optimizer, fallback)

    def start_epoch(self) -> None:
        plan = getattr(self.optimizer, "_cpu_step_plan", None)
        self.lean = plan(self.mlp.params) if plan is not None else None
        self.mlp.prepare(own_grads=self.lean is not None)

    def step(self, inputs, target) -> torch.Tensor:
        if not self.mlp.accepts(inputs, target):
            loss = self.fallback.step(inputs, target)
            if self.lean is not None:
                # step() may have made state the lean step holds (first momentum buffers): renew it
                self.lean = self.optimizer._cpu_step_plan(self.mlp.params)
            return loss
        if self.lean is not None:
            loss = self.mlp(inputs[0], target, replace_grads=True)
            self.lean()
            return loss
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.mlp(inputs[0], target)
        self.optimizer.step()
        return loss

    def take_loss_sum(self) -> None:
        return None
