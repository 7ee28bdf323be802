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
import numbers

import torch


def _check(group):
    """Raise ValueError/TypeError when a group's hyper-parameters make no sense."""
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        value = group[name]
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value)):
            raise TypeError(f"SGD: {name} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"SGD: {name} must be >= 0, got {value}; pass a non-negative {name}")
    # mu = 1 never forgets a gradient; mu > 1 amplifies old ones: divergence
    if group["momentum"] >= 1:
        raise ValueError(f"SGD: momentum must be in [0, 1), got {group['momentum']}; "
                         "0.9 is the usual value")
    if group["dampening"] > 1:
        raise ValueError(f"SGD: dampening must be in [0, 1], got {group['dampening']}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("SGD: Nesterov needs momentum > 0 and dampening = 0, got "
                         f"momentum={group['momentum']}, dampening={group['dampening']}")


class SGD:
    """Stochastic gradient descent with momentum; see the module docstring for the update.

    params: an iterable of tensors, or of dicts {"params": [...], "lr": ..., ...}, one per
        param group; a group's keys override the defaults below (other keys are kept, as torch).
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
        _check(self.defaults)
        self.foreach = foreach
        self.state = {}          # parameter -> {"momentum_buffer": tensor shaped like it}
        self.param_groups = []   # list of dicts: "params" plus every hyper-parameter
        if isinstance(params, torch.Tensor):
            raise TypeError("SGD: params must be an iterable of tensors or dicts, got one tensor; "
                            "pass model.parameters() or [tensor]")
        groups = list(params)
        if not groups:
            raise ValueError("SGD: got an empty parameter list; is every parameter frozen?")
        for group in groups if isinstance(groups[0], dict) else [{"params": groups}]:
            self.add_param_group(group)

    def add_param_group(self, group):
        """Add a dict {"params": tensors, hyper-parameter: value, ...}; unset ones take the
        defaults."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("SGD: a param group must be a dict with a 'params' key, "
                            f"got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError("SGD: a param group's 'params' must all be tensors")
        group = {**self.defaults, **group, "params": params}
        _check(group)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        ids = [id(p) for p in params]
        if len(set(ids)) != len(ids) or seen.intersection(ids):
            raise ValueError("SGD: a parameter appears twice (in one group or in two); "
                             "give each once")
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
        """Take the hyper-parameters and buffers of state_dict(); groups must match in number and
        size. Everything is checked before anything changes: a state dict of another optimizer is
        refused."""
        groups, state = _checked_state_dict(state_dict, self.param_groups)
        for group, saved_group in zip(self.param_groups, groups):
            saved_params = group["params"]
            group.clear()
            group.update({**saved_group, "params": saved_params})
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = {}
        for i, s in state.items():
            p = params[int(i)]  # buffers follow p's device and dtype
            self.state[p] = {k: v.to(device=p.device, dtype=p.dtype, copy=True)
                             for k, v in s.items()}


_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "decoupled_weight_decay")


def _looks_like(groups, state):
    """A guess, from its keys, at which optimizer wrote a state dict that is not this SGD's."""
    keys = {k for g in groups for k in g} | {k for s in state.values() for k in s}
    if "betas" in keys or "exp_avg" in keys:
        return "torch.optim.Adam or AdamW's (betas, exp_avg)", ""
    if "momentum" in keys and "maximize" in keys and "decoupled_weight_decay" not in keys:
        return ("torch.optim.SGD's (maximize, foreach, no decoupled_weight_decay)",
                " (torch.optim.SGD's update is this one: to continue it here, add "
                "decoupled_weight_decay=False to each of its param_groups)")
    return "another optimizer's", ""


def _checked_state_dict(state_dict, param_groups):
    """-> (groups, state) of a minicnn SGD state dict that fits these param groups, or a clear
    error."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise TypeError("SGD.load_state_dict: expected a dict with 'state' and 'param_groups' "
                        f"(SGD.state_dict()'s layout), got {type(state_dict).__name__}")
    groups, state = state_dict["param_groups"], state_dict["state"]
    missing = sorted({k for g in groups for k in _KEYS if k not in g})
    foreign = sorted({k for s in state.values() for k in s if k != "momentum_buffer"})
    if missing or foreign or any(g.get("maximize") for g in groups):
        what = f"lacks {missing}" if missing else f"holds {foreign or ['maximize=True']}"
        looks_like, hint = _looks_like(groups, state)
        raise ValueError(f"SGD.load_state_dict: this state dict {what}; it looks like "
                         f"{looks_like}, not minicnn.optim.SGD's. Load it into the optimizer that "
                         f"saved it, or start this SGD afresh{hint}; nothing was changed")
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in param_groups]:
        raise ValueError("SGD.load_state_dict: the saved groups hold "
                         f"{[len(g['params']) for g in groups]} parameters, this optimizer's "
                         f"{[len(g['params']) for g in param_groups]}; "
                         "build it with the same groups")
    for g in groups:
        _check(g)
    params = [p for g in param_groups for p in g["params"]]
    for i, s in state.items():
        if not 0 <= int(i) < len(params):
            raise ValueError(f"SGD.load_state_dict: state for parameter {i}, "
                             f"but there are {len(params)}")
        v = s.get("momentum_buffer")
        if not isinstance(v, torch.Tensor) or v.shape != params[int(i)].shape:
            raise ValueError(f"SGD.load_state_dict: parameter {i}'s momentum_buffer is "
                             f"{getattr(v, 'shape', v)!r}, the parameter is "
                             f"{tuple(params[int(i)].shape)}; was it saved from another model?")
    return groups, state
