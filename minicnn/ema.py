"""An exponential moving average (EMA) of a model's weights, kept beside the model as it trains.

After every `every`-th optimizer step, for each weight w of the model and its average w_ema:
    w_ema <- d*w_ema + (1 - d)*w      d = decay in [0, 1); 1/(1 - d) is the horizon in averages
    d_t = min(decay, (1 + t) / (10 + t))     with warmup=True, t = averages done before this one
BatchNorm's running mean and variance are averaged the same way; integer buffers are copied.
EMA wraps the optimizer, so fit needs no hook:  opt = EMA(SGD(model.parameters(), lr), model);
fit(model, ..., opt, ...); then evaluate(opt.model, valid): the average, the model untouched.
Sources: Polyak & Juditsky 1992, "Acceleration of stochastic approximation by averaging";
timm's ModelEmaV2 (the same update, every state_dict entry); the CIFAR-10 speedruns airbench
and hlb-CIFAR10. docs/ema.md: the BatchNorm choice, the defaults, how airbench's differs.
"""
import copy

import torch


def decay_at(t, decay, *, warmup=False):
    """The decay of average number t (0 for the first): decay, or with warm-up
    min(decay, (1 + t) / (10 + t)), so that the first averages follow the model closely."""
    return min(decay, (1 + t) / (10 + t)) if warmup else decay


class EMA:
    """An optimizer that steps the wrapped one, then moves an averaged copy of the model.

    optimizer: the optimizer to wrap (minicnn's SGD, a torch.optim one); its param_groups are
        EMA's, the same list, so fit sets the LR through them as before.
    model: the model the optimizer trains; EMA copies it (deepcopy) into self.model, in eval
        mode with requires_grad False, and averages into that copy.
    decay=0.99: d in the module docstring (timm's default is 0.9999, a horizon of 10,000
        averages; 0.99 is 100, about an epoch of the lessons' Fashion-MNIST runs).
    every=1: average after every `every`-th step; d applies per average, not per step.
    warmup=False: d_t = min(decay, (1 + t) / (10 + t)), TensorFlow's ExponentialMovingAverage
        with num_updates; off by default, as in timm's ModelEmaV2.
    """

    def __init__(self, optimizer, model, *, decay=0.99, every=1, warmup=False):
        if not (0 <= decay < 1 and isinstance(every, int) and every >= 1):  # NaN fails too
            raise ValueError(f"EMA: decay={decay!r} must be in [0, 1) (1 never moves the average,"
                             f" NaN breaks it) and every={every!r} an int >= 1")
        self.optimizer, self.trained_model = optimizer, model
        self.decay, self.every, self.warmup = decay, every, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # the average, w_ema
        self.steps = 0    # optimizer steps taken through EMA
        self.averages = 0  # averages done: t in the warm-up

    @property
    def param_groups(self):
        """The wrapped optimizer's param groups, the same list (fit sets each group's LR)."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """The wrapped optimizer's step (its return value), then every `every` steps an average."""
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.every == 0:
            self.update()
        return loss

    @torch.no_grad()
    def update(self):
        """Move every entry of self.model's state_dict toward the trained model's."""
        d = decay_at(self.averages, self.decay, warmup=self.warmup)
        device = next(self.trained_model.parameters()).device
        if next(self.model.parameters()).device != device:  # fit(device=...) moved the model
            self.model.to(device)
        trained = self.trained_model.state_dict()  # weights and buffers, the same order as ours
        for w_ema, w in zip(self.model.state_dict().values(), trained.values()):
            if w_ema.is_floating_point():  # weights, BatchNorm's running mean and variance
                w_ema.lerp_(w, 1 - d)      # w_ema <- d*w_ema + (1 - d)*w
            else:                          # num_batches_tracked, a count: copied
                w_ema.copy_(w)
        self.averages += 1

    def state_dict(self):
        """The wrapped optimizer's state_dict plus "ema": the average and the two counters, so
        that a checkpoint, or lr_find's restore, keeps the average too."""
        return {**self.optimizer.state_dict(),
                "ema": {"model": self.model.state_dict(), "steps": self.steps,
                        "averages": self.averages}}

    def load_state_dict(self, state_dict):
        """Take what state_dict() gave: the optimizer's part, then the average and counters."""
        if "ema" not in state_dict:
            raise ValueError("EMA.load_state_dict: no 'ema' entry, so not an EMA's state_dict; "
                             "a bare optimizer's goes to ema.optimizer.load_state_dict")
        own = {k: v for k, v in state_dict.items() if k != "ema"}
        self.optimizer.load_state_dict(own)  # it refuses a wrong one before anything changes
        self.model.load_state_dict(state_dict["ema"]["model"])
        self.steps, self.averages = state_dict["ema"]["steps"], state_dict["ema"]["averages"]
