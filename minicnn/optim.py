"""SGD written out: momentum, dampening, Nesterov, L2 or decoupled weight decay, per-group LRs.

One step, for each parameter p with gradient g (lr = learning rate, mu = momentum in [0, 1),
tau = dampening, wd = weight decay, v = momentum buffer, kept in self.state[p]):
    g <- g + wd*p                L2 weight decay (decoupled_weight_decay: p <- p - lr*wd*p instead)
    v <- g                       first step: the buffer starts as the gradient, no dampening
    v <- mu*v + (1 - tau)*g      every later step
    d <- g + mu*v                Nesterov;  d <- v  without it;  d <- g  when mu = 0
    p <- p - lr*d
Sources: Sutskever et al. 2013, "On the importance of initialization and momentum in deep
learning"; PyTorch's torch/optim/sgd.py (the same numbers); Loshchilov & Hutter 2017 (decoupled
weight decay, fastai 0.7's). docs/sgd.md: how it differs from both, and why two code paths.
"""
import math

import torch


class SGD:
    """Stochastic gradient descent with momentum; see the module docstring for the update.

    params: an iterable of tensors (or one tensor), or of dicts {"params": [...], "lr": ...},
        one per param group; a group's keys override the defaults below (others kept, as torch).
    lr: learning rate (>= 0; 0 is allowed, as in torch, e.g. for a group that should not move).
    momentum=0, dampening=0, weight_decay=0, nesterov=False: as torch.optim.SGD.
    decoupled_weight_decay=False: shrink p by lr*wd*p instead of adding wd*p to the gradient.
    foreach=None: True = torch._foreach_* path, False = the loop, None = foreach on CUDA only.
    """

    def __init__(self, params, lr, *, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, decoupled_weight_decay=False, foreach=None):
        self.defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                             weight_decay=weight_decay, nesterov=nesterov,
                             decoupled_weight_decay=decoupled_weight_decay)
        _check_hyper(self.defaults)
        self.foreach = foreach
        self.state = {}          # parameter -> {"momentum_buffer": tensor shaped like it}
        self.param_groups = []   # list of dicts: "params" plus every hyper-parameter
        if isinstance(params, torch.nn.Module):  # SGD(model), a common slip
            raise TypeError("SGD: pass model.parameters(), not the model")
        groups = [params] if isinstance(params, torch.Tensor) else list(params)
        if not groups:
            raise ValueError("SGD: params is empty; is every parameter frozen?")
        for group in groups if isinstance(groups[0], dict) else [{"params": groups}]:
            self.add_param_group(group)

    def add_param_group(self, group):
        """Add a dict {"params": tensors, hyper-parameter: value, ...}; unset ones take the
        defaults."""
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group = {**self.defaults, **group, "params": params}
        _check_hyper(group)
        ids = [id(p) for g in self.param_groups + [group] for p in g["params"]]
        if len(set(ids)) != len(ids):  # it would be stepped twice
            raise ValueError("SGD: a parameter appears twice (in one group or in two)")
        self.param_groups.append(group)

    def zero_grad(self, set_to_none=True):
        """Clear every gradient: None (the default, frees memory) or zeros."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_()
                        p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]  # no grad: skip, no state
            if params:
                foreach = params[0].is_cuda if self.foreach is None else self.foreach
                (self._step_foreach if foreach else self._step_loop)(group, params)
        return loss

    def _step_loop(self, group, params):
        """The reference: the update of the module docstring, one parameter at a time."""
        lr, mu, tau, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        for p in params:
            g = p.grad
            if wd != 0:
                if group["decoupled_weight_decay"]:
                    p.mul_(1 - lr * wd)                          # p <- p - lr*wd*p
                else:
                    g = g.add(p, alpha=wd)                       # g <- g + wd*p (p.grad untouched)
            if mu != 0:
                state = self.state.setdefault(p, {})
                v = state.get("momentum_buffer")
                if v is None:
                    v = state["momentum_buffer"] = g.clone()     # v <- g on the first step
                else:
                    v.mul_(mu).add_(g, alpha=1 - tau)            # v <- mu*v + (1 - tau)*g
                g = g.add(v, alpha=mu) if group["nesterov"] else v
            p.add_(g, alpha=-lr)                                 # p <- p - lr*d

    def _step_foreach(self, group, params):
        """The same arithmetic in the same order, one torch._foreach_* call per line."""
        lr, mu, tau, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        grads, grads_are_ours = [p.grad for p in params], False
        if wd != 0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * wd)
            else:
                grads, grads_are_ours = torch._foreach_add(grads, params, alpha=wd), True
        if mu != 0:
            bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params]
            if any(v is None for v in bufs):                     # someone's first step: v <- g
                for i, (p, v) in enumerate(zip(params, bufs)):
                    if v is None:
                        bufs[i] = self.state.setdefault(p, {})["momentum_buffer"] = grads[i].clone()
                    else:
                        v.mul_(mu).add_(grads[i], alpha=1 - tau)
            else:
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads, alpha=1 - tau)
            if not group["nesterov"]:
                grads = bufs
            elif grads_are_ours:
                torch._foreach_add_(grads, bufs, alpha=mu)
            else:                                                # never write into p.grad
                grads = torch._foreach_add(grads, bufs, alpha=mu)
        torch._foreach_add_(params, grads, alpha=-lr)

    def state_dict(self):
        """{"state": {index: {"momentum_buffer": copy}}, "param_groups": [...]}: torch's layout,
        parameters named by their position over all groups, buffers copied."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**g, "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        state = {index[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Take the hyper-parameters and buffers of state_dict(). Another optimizer's state dict,
        or one of other groups or shapes, is refused before anything changes."""
        groups, state = state_dict["param_groups"], state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        _check_state_dict(groups, state, self.param_groups, params)
        for group, saved_group in zip(self.param_groups, groups):
            own_params = group["params"]
            group.clear()
            group.update(saved_group, params=own_params)
        self.state = {}
        for i, s in state.items():
            p = params[int(i)]  # buffers follow p's device and dtype
            self.state[p] = {k: v.to(device=p.device, dtype=p.dtype, copy=True)
                             for k, v in s.items()}


_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "decoupled_weight_decay")


def _check_hyper(group):
    """ValueError for hyper-parameters that would make every step silently wrong (momentum 1
    never forgets a gradient, above 1 it diverges)."""
    lr, mu, tau, wd = (group[k] for k in ("lr", "momentum", "dampening", "weight_decay"))
    if not (0 <= lr < math.inf and 0 <= wd < math.inf):  # NaN fails too
        raise ValueError(f"SGD: lr={lr} and weight_decay={wd} must be finite and >= 0")
    if not (0 <= mu < 1 and 0 <= tau <= 1) or group["nesterov"] and (mu == 0 or tau != 0):
        raise ValueError(f"SGD: momentum={mu} must be in [0, 1), dampening={tau} in [0, 1]; "
                         "nesterov needs momentum > 0 and dampening 0")


def _check_state_dict(groups, state, param_groups, params):
    """Refuse another optimizer's state dict (torch.optim.SGD's lacks decoupled_weight_decay,
    Adam's momentum), or one of other group sizes or parameter shapes."""
    missing = {k for g in groups for k in _KEYS if k not in g}
    if missing or any(g.get("maximize") for g in groups):
        raise ValueError(f"state_dict of another optimizer: lacks {sorted(missing)} or maximizes")
    for g in groups:
        _check_hyper(g)
    sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in param_groups]
    shapes = {int(i): getattr(s.get("momentum_buffer"), "shape", None) for i, s in state.items()}
    if sizes[0] != sizes[1] or any(shape != params[i].shape for i, shape in shapes.items()):
        raise ValueError(f"state_dict: group sizes {sizes[0]} or buffers differ from {sizes[1]}")
