"""The reference's parameter names and layouts, to and from our parameter pytree.

The PyTorch reference names its tensors `codebook0.weight`, `step{m}.codebook.weight`,
`step{m}.MLPconcat.weight` (d x 2d, acting on concat(c, x̂)) and `.bias`, or for QINCo-LR
`step{m}.MLPconcat.0.weight` (h x 2d) and `.1.weight` (d x h), and
`step{m}.residual_block{l}.0.weight` (h x d) and `.2.weight` (d x h). Steps are numbered
from 1 in QINCo / QINCo-LR (step 0 is codebook0) and from 0 in IVF-QINCo.

Torch stores Linear weights as (out, in); Flax kernels are (in, out). The concat weight
is split column-wise into its codeword and input halves (see model.py).
"""

from __future__ import annotations

import jax
import numpy as np

from qinco_jax.config import QincoConfig
from qinco_jax.models.qinco import Params, param_shapes

StateDict = dict[str, np.ndarray]


def first_step_number(config: QincoConfig) -> int:
    return 0 if config.is_ivf else 1


def params_from_state_dict(config: QincoConfig, sd: StateDict) -> Params:
    """Our pytree from a reference state dict, checking every name and shape."""
    d, h = config.d, config.h
    remaining = dict(sd)

    def take(name, shape):
        if name not in remaining:
            raise ValueError(f"the checkpoint has no tensor {name!r} that {config.describe()} needs")
        a = np.asarray(remaining.pop(name), dtype=np.float32)
        if a.shape != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {a.shape}, {config.describe()} needs {tuple(shape)}")
        return a

    codebook0 = take("codebook0.weight", (config.codebook0_size, d))
    per_step = []
    for m in range(first_step_number(config), first_step_number(config) + config.num_steps):
        p = f"step{m}."
        step = {"codebook": take(p + "codebook.weight", (config.K, d))}
        if config.variant == "lowrank":
            w0 = take(p + "MLPconcat.0.weight", (h, 2 * d))
            w1 = take(p + "MLPconcat.1.weight", (d, h))
            step["concat_codeword"] = {"kernel": w0[:, :d].T}
            step["concat_input"] = {"kernel": w0[:, d:].T}
            step["concat_out"] = {"kernel": w1.T}
        else:
            w = take(p + "MLPconcat.weight", (d, 2 * d))
            step["concat_codeword"] = {"kernel": w[:, :d].T, "bias": take(p + "MLPconcat.bias", (d,))}
            step["concat_input"] = {"kernel": w[:, d:].T}
        for l in range(config.L):
            q = f"{p}residual_block{l}."
            step[f"residual_blocks_{l}"] = {
                "up": {"kernel": take(q + "0.weight", (h, d)).T},
                "down": {"kernel": take(q + "2.weight", (d, h)).T},
            }
        per_step.append(step)
    if remaining:
        raise ValueError(f"the checkpoint has tensors that {config.describe()} does not: {sorted(remaining)}")
    steps = _stack(per_step, config)
    return {"codebook0": codebook0, "steps": steps}


def _stack(per_step: list[Params], config: QincoConfig) -> Params:
    if per_step:
        return jax.tree.map(lambda *xs: np.ascontiguousarray(np.stack(xs)), *per_step)
    # M = 1: no neural step. Keep the structure, with a leading axis of size 0.
    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), param_shapes(config)["steps"])


def state_dict_from_params(config: QincoConfig, params: Params) -> StateDict:
    """The reference's state dict (names in its module order) from our pytree."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    sd: StateDict = {"codebook0.weight": params["codebook0"]}
    steps = params["steps"]
    for i in range(config.num_steps):
        s = jax.tree.map(lambda a: a[i], steps)
        p = f"step{i + first_step_number(config)}."
        sd[p + "codebook.weight"] = s["codebook"]
        if config.variant == "lowrank":
            sd[p + "MLPconcat.0.weight"] = np.concatenate(
                [s["concat_codeword"]["kernel"].T, s["concat_input"]["kernel"].T], axis=1)
            sd[p + "MLPconcat.1.weight"] = s["concat_out"]["kernel"].T
        else:
            sd[p + "MLPconcat.weight"] = np.concatenate(
                [s["concat_codeword"]["kernel"].T, s["concat_input"]["kernel"].T], axis=1)
            sd[p + "MLPconcat.bias"] = s["concat_codeword"]["bias"]
        for l in range(config.L):
            q = f"{p}residual_block{l}."
            sd[q + "0.weight"] = s[f"residual_blocks_{l}"]["up"]["kernel"].T
            sd[q + "2.weight"] = s[f"residual_blocks_{l}"]["down"]["kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
