"""Learning-rate schedule and stopping rule of the QINCo reference training.

After every epoch the validation MSE is appended. The rules, in the reference's order:

* if more than 50 epochs passed since the last learning-rate change and none of the
  last 50 values is the best so far: stop;
* else if more than 10 epochs passed since the last change and none of the last 10
  values is the best: divide the learning rate by 10 (and stop once it falls below
  2e-6).

Stopping is encoded as lr == 0. The state is a few numbers and a list, so it goes into
a JSON checkpoint as is (`state_dict` / `from_state_dict`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_LR = 2e-6
PATIENCE_REDUCE = 10
PATIENCE_STOP = 50


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one validation value changed."""

    is_best: bool  # this epoch's model is the best so far: store it
    reduced_lr: bool
    stop: bool


@dataclasses.dataclass
class Scheduler:
    lr: float
    loss_values: list[float] = dataclasses.field(default_factory=list)
    last_lr_update: int = 0

    def append_loss(self, loss: float) -> Decision:
        self.loss_values.append(float(loss))
        values = np.asarray(self.loss_values, dtype=float)
        epoch = len(values)
        best = values.min()
        is_best = bool(values[-1] == best)
        reduced = False
        if epoch > self.last_lr_update + PATIENCE_STOP and np.all(values[-PATIENCE_STOP:] > best):
            self.last_lr_update = epoch
            self.lr = 0.0
        elif epoch > self.last_lr_update + PATIENCE_REDUCE and np.all(values[-PATIENCE_REDUCE:] > best):
            self.last_lr_update = epoch
            self.lr /= 10
            reduced = True
            if self.lr < MIN_LR:
                self.lr = 0.0
        return Decision(is_best=is_best, reduced_lr=reduced, stop=self.should_stop())

    def should_stop(self) -> bool:
        return self.lr == 0

    def state_dict(self) -> dict:
        return {"lr": self.lr, "loss_values": list(self.loss_values), "last_lr_update": self.last_lr_update}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Scheduler":
        return cls(lr=float(state["lr"]), loss_values=[float(v) for v in state["loss_values"]],
                   last_lr_update=int(state["last_lr_update"]))
