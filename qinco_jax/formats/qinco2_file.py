"""QINCo2's `.pt` files, read and written without PyTorch.

The QINCo2 code saves a training checkpoint, `torch.save` of a plain dict

    {epoch, model: <QINCo.state_dict()>, optimizer, scheduler, logger,
     parameters: {K, M, de, dh, L, A, B, ivf_in_use, ivf_K, qinco1_mode (those set)},
     data_dim}

and reads it back with `torch.load(weights_only=True)` and a strict `load_state_dict`.
It is read here through the same restricted unpickler as QINCo v1's files
(`torch_pickle.load_pt`: tensors, plain containers and scalars; nothing runs).

State dict names (steps numbered from 0; step 0 is a plain codebook, or, with IVF, the
frozen normalised centroids `steps.0.ivf_centroids.weight` and M neural steps 1..M):

    data_mean (d,), data_std ()                    the normalisation, x_n = (x - mean) / std
    steps.{m}.xtarget_mean / xtarget_var (d,)       running stats (codeword resets only)
    steps.{m}.codebook.weight (K, d)
    steps.{m}.substep.codebook.weight (K, d)        when A > 0
    steps.{m}.concat.mlp.weight (De, De + d), .bias (De,)   on concat(P_in c, x̂)
    steps.{m}.residual_blocks.{l}.up_proj.weight (Dh, De), down_proj.weight (De, Dh)
    steps.{m}.in_proj.weight (De, d), out_proj.weight (d, De)  when De != d

Our pytree keeps QINCo v1's layout (see model.py) and adds `in_proj`, `out_proj`,
`substep_codebook` per step and the top-level `normalisation` and `xtarget_stats`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qinco_jax.formats import torch_pickle
from qinco_jax.config import QincoConfig
from qinco_jax.models.qinco import Params, QincoModel
from qinco_jax.formats.torch_pickle import CheckpointError, Global, PersistentId, Reduce, TorchWriter

StateDict = dict[str, np.ndarray]

CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "logger", "parameters", "data_dim")
_INT_PARAMETERS = ("K", "M", "de", "dh", "L", "A", "B", "ivf_K")
_BOOL_PARAMETERS = ("ivf_in_use", "qinco1_mode")
_REQUIRED_PARAMETERS = ("K", "M", "dh", "L", "A", "B")


def is_qinco2_checkpoint(obj: Any) -> bool:
    """Whether an unpickled `.pt` object looks like a QINCo2 checkpoint dict."""
    return isinstance(obj, dict) and "model" in obj and ("parameters" in obj or "data_dim" in obj)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def config_from_checkpoint(obj: dict, name: str = "") -> QincoConfig:
    """The model configuration of a QINCo2 checkpoint dict, from its `parameters` and
    `data_dim`. `name`: the file name; `qinco1-*.pt` means qinco1_mode when the
    parameters do not say."""
    params = obj.get("parameters")
    if not isinstance(params, dict):
        raise CheckpointError(f"QINCo2 checkpoint without a 'parameters' dict (got {type(params).__name__}): "
                              "its model sizes are unknown")
    unknown = sorted(str(k) for k in params if k not in _INT_PARAMETERS + _BOOL_PARAMETERS)
    if unknown:
        raise CheckpointError(f"QINCo2 'parameters' has unknown entries {unknown}")
    for k, v in params.items():
        if k in _INT_PARAMETERS and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise CheckpointError(f"QINCo2 parameter {k!r} is {v!r}, expected an integer")
        if k in _BOOL_PARAMETERS and not isinstance(v, (bool, np.bool_)):
            raise CheckpointError(f"QINCo2 parameter {k!r} is {v!r}, expected true or false")
    missing = [k for k in _REQUIRED_PARAMETERS if k not in params]
    if missing:
        raise CheckpointError(f"QINCo2 'parameters' lacks {missing}")
    d = obj.get("data_dim")
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
        raise CheckpointError(f"QINCo2 checkpoint 'data_dim' is {d!r}, expected an integer")
    ivf = bool(params.get("ivf_in_use", False))
    if ivf and "ivf_K" not in params:
        raise CheckpointError("QINCo2 'parameters' says ivf_in_use but gives no ivf_K")
    qinco1_mode = params.get("qinco1_mode")
    if qinco1_mode is None:
        qinco1_mode = Path(name).name.startswith("qinco1-")
    try:
        return QincoConfig(d=int(d), K=int(params["K"]), M=int(params["M"]), L=int(params["L"]),
                           h=int(params["dh"]), variant="ivf" if ivf else "qinco",
                           K_IVF=int(params["ivf_K"]) if ivf else 0, arch="qinco2",
                           de=int(params.get("de") or 0), A=int(params["A"]), B=int(params["B"]),
                           qinco1_mode=bool(qinco1_mode))
    except ValueError as e:
        raise CheckpointError(f"QINCo2 'parameters' {params} (data_dim {d}) do not describe a model: {e}") from None


def params_from_qinco2_state_dict(config: QincoConfig, sd: StateDict) -> Params:
    """Our pytree from a QINCo2 state dict, checking every name and shape against the
    configuration (so `parameters` that disagree with the tensors are named)."""
    d, de, h, K = config.d, config.embed_dim, config.h, config.K
    remaining = dict(sd)

    def take(name, shape):
        if name not in remaining:
            raise CheckpointError(f"the state dict has no tensor {name!r}, which the 'parameters' "
                                  f"({config.describe()}) imply")
        a = remaining.pop(name)
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            raise CheckpointError(f"state dict entry {name!r} is not a float tensor")
        if a.shape != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {a.shape}, the 'parameters' ({config.describe()}) "
                                  f"imply {tuple(shape)}")
        return np.asarray(a, np.float32)

    first = 1 if config.is_ivf else 0  # the number of the first step with running stats
    normalisation = {"mean": take("data_mean", (d,)), "std": take("data_std", ())}
    if config.is_ivf:
        codebook0 = take("steps.0.ivf_centroids.weight", (config.K_IVF, d))
    else:
        codebook0 = take("steps.0.codebook.weight", (K, d))
    stats = {"mean": [], "var": []}
    per_step = []
    for m in range(first, first + config.M):
        p = f"steps.{m}."
        stats["mean"].append(take(p + "xtarget_mean", (d,)))
        stats["var"].append(take(p + "xtarget_var", (d,)))
        if m == 0:
            continue  # codebook0, taken above
        w = take(p + "concat.mlp.weight", (de, de + d))
        step = {"codebook": take(p + "codebook.weight", (K, d)),
                "concat_codeword": {"kernel": w[:, :de].T, "bias": take(p + "concat.mlp.bias", (de,))},
                "concat_input": {"kernel": w[:, de:].T}}
        for l in range(config.L):
            q = f"{p}residual_blocks.{l}."
            step[f"residual_blocks_{l}"] = {"up": {"kernel": take(q + "up_proj.weight", (h, de)).T},
                                            "down": {"kernel": take(q + "down_proj.weight", (de, h)).T}}
        if config.has_projections:
            step["in_proj"] = {"kernel": take(p + "in_proj.weight", (de, d)).T}
            step["out_proj"] = {"kernel": take(p + "out_proj.weight", (d, de)).T}
        if config.has_substep:
            step["substep_codebook"] = take(p + "substep.codebook.weight", (K, d))
        per_step.append(step)
    if remaining:
        raise CheckpointError(f"the state dict has tensors that the 'parameters' ({config.describe()}) do not "
                              f"imply: {sorted(remaining)[:8]}")
    if per_step:
        steps = jax.tree.map(lambda *xs: np.ascontiguousarray(np.stack(xs)), *per_step)
    else:
        from qinco_jax.models.qinco import param_shapes
        steps = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), param_shapes(config)["steps"])
    return {"codebook0": codebook0, "steps": steps, "normalisation": normalisation,
            "xtarget_stats": {k: np.stack(v) for k, v in stats.items()}}


def model_from_qinco2_checkpoint(obj: dict, name: str = "") -> QincoModel:
    """A QincoModel (arch "qinco2") from an unpickled QINCo2 checkpoint dict."""
    config = config_from_checkpoint(obj, name)
    sd = obj["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"QINCo2 checkpoint 'model' is a {type(sd).__name__}, expected a state dict")
    # Weights saved from a distributed wrapper carry a "module." prefix; the reference strips it.
    sd = {str(k).removeprefix("module."): v for k, v in sd.items()}
    params = params_from_qinco2_state_dict(config, sd)
    try:
        return QincoModel(config, params)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def qinco2_state_dict(model: QincoModel) -> StateDict:
    """The QINCo2 state dict of a QINCo2 model, in the reference module's order."""
    c = model.config
    if not c.is_qinco2:
        raise CheckpointError(f"{c.describe()} is not a QINCo2 model: save it as a QINCo v1 .pt")
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), model.params)
    sd: StateDict = {"data_mean": p["normalisation"]["mean"], "data_std": p["normalisation"]["std"]}
    first = 1 if c.is_ivf else 0
    if c.is_ivf:
        sd["steps.0.ivf_centroids.weight"] = p["codebook0"]
    for m in range(first, first + c.M):
        q = f"steps.{m}."
        sd[q + "xtarget_mean"] = p["xtarget_stats"]["mean"][m - first]
        sd[q + "xtarget_var"] = p["xtarget_stats"]["var"][m - first]
        if m == 0:
            sd[q + "codebook.weight"] = p["codebook0"]
            continue
        s = jax.tree.map(lambda a: a[m - 1], p["steps"])
        if c.has_substep:
            sd[q + "substep.codebook.weight"] = s["substep_codebook"]
        sd[q + "codebook.weight"] = s["codebook"]
        sd[q + "concat.mlp.weight"] = np.concatenate([s["concat_codeword"]["kernel"].T,
                                                      s["concat_input"]["kernel"].T], axis=1)
        sd[q + "concat.mlp.bias"] = s["concat_codeword"]["bias"]
        for l in range(c.L):
            sd[f"{q}residual_blocks.{l}.up_proj.weight"] = s[f"residual_blocks_{l}"]["up"]["kernel"].T
            sd[f"{q}residual_blocks.{l}.down_proj.weight"] = s[f"residual_blocks_{l}"]["down"]["kernel"].T
        if c.has_projections:
            sd[q + "in_proj.weight"] = s["in_proj"]["kernel"].T
            sd[q + "out_proj.weight"] = s["out_proj"]["kernel"].T
    # np.array, not np.ascontiguousarray, which makes data_std's 0-d array 1-d.
    return {k: np.array(v, np.float32, order="C") for k, v in sd.items()}


def qinco2_parameters(config: QincoConfig) -> dict:
    """The `parameters` entry QINCo2 writes: its non-null settings, in its order."""
    out = {"K": config.K, "M": config.M}
    if config.has_projections:
        out["de"] = config.embed_dim
    out.update(dh=config.h, L=config.L, A=config.A, B=config.B)
    if config.is_ivf:
        out.update(ivf_in_use=True, ivf_K=config.K_IVF)
    if config.qinco1_mode:
        out["qinco1_mode"] = True
    return out


def _plain_tensor(writer: TorchWriter, array: np.ndarray):
    """A float32 tensor as state_dict() holds it (not an nn.Parameter)."""
    a = np.array(array, dtype="<f4", order="C")  # keeps 0-d (data_std) 0-d
    key = str(len(writer.storages))
    writer.storages.append(a)
    stride = tuple(int(np.prod(a.shape[i + 1:])) for i in range(a.ndim))
    pid = PersistentId(("storage", Global("torch", "FloatStorage"), key, "cpu", int(a.size)))
    return Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                  (pid, 0, tuple(int(n) for n in a.shape), stride, False, writer.ordered_dict()))


def write_qinco2_pt(model: QincoModel, path: str | os.PathLike, archive_name: str | None = None) -> None:
    """Write the checkpoint dict QINCo2 loads (`torch.load(weights_only=True)` and a
    strict `load_state_dict`). No training state travels with our models, so epoch,
    optimizer, scheduler and logger are None, as QINCo2 writes them before training:
    resuming from the file starts those afresh. Not atomic (see checkpoint.save_model)."""
    writer = TorchWriter()
    sd = qinco2_state_dict(model)
    root = {"epoch": None, "model": {k: _plain_tensor(writer, v) for k, v in sd.items()},
            "optimizer": None, "scheduler": None, "logger": None,
            "parameters": qinco2_parameters(model.config), "data_dim": model.config.d}
    torch_pickle.write_pt(path, writer, root, archive_name=archive_name or Path(path).stem)
