"""Loading and saving models: the reference's `.pt` files and our own directories.

Three formats:

* `.pt` — QINCo v1's: `torch.save` of a whole `model_qinco` module (QINCo,
  QINCoLR, IVFQINCo or PQ_QINCo). Read and written without PyTorch by
  `qinco_jax.formats.torch_pickle`; the files we write load with `torch.load(path,
  weights_only=False)` into the reference's own classes.
* `.pt` — QINCo2's: a checkpoint dict with a state dict and its `parameters`
  (`qinco_jax.formats.qinco2_file`); QINCo2 models are saved in it.
* a directory — ours: `model.json` (kind, configuration, format version) and an
  orbax checkpoint `params/` of the parameter pytree (model units, float32).

`load_model` tells them apart by what is on disk; `save_model` by the name (`*.pt`
is the reference format, anything else a directory). Both writers are atomic.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from qinco_jax.formats import qinco2_file
from qinco_jax.formats import torch_pickle
from qinco_jax.config import QincoConfig
from qinco_jax.formats.io import atomic_directory, atomic_path
from qinco_jax.models.qinco import AnyModel, PQQincoModel, QincoModel, param_shapes
from qinco_jax.formats.state_dict import first_step_number, params_from_state_dict, state_dict_from_params
from qinco_jax.formats.torch_pickle import CheckpointError, TorchModule, TorchWriter

__all__ = ["CheckpointError", "load_model", "save_model", "to_faiss_qinco", "model_from_torch_module"]

FORMAT_NAME = "qinco-jax-model"
FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
PARAMS_DIR = "params"

# The reference's class for each variant, and back.
_CLASS_OF_VARIANT = {"qinco": "QINCo", "lowrank": "QINCoLR", "ivf": "IVFQINCo"}
_VARIANT_OF_CLASS = {v: k for k, v in _CLASS_OF_VARIANT.items()}


def _not_a_checkpoint(path, why: str) -> CheckpointError:
    return CheckpointError(f"not a QINCo checkpoint: {path}: {why} "
                           "(expected a .pt file or a qinco-jax model directory)")


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike) -> AnyModel:
    """A QincoModel or PQQincoModel from a reference `.pt` file or a model directory."""
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise _not_a_checkpoint(path, f"a directory without {CONFIG_FILE}")
        return _load_directory(path)
    obj = torch_pickle.load_pt(path)  # says which files are missing, not zips, or unsafe
    if qinco2_file.is_qinco2_checkpoint(obj):
        try:
            return qinco2_file.model_from_qinco2_checkpoint(obj, path.name)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # a damaged file: name it
            raise CheckpointError(f"{path}: {e}") from None
    if isinstance(obj, Mapping) and {"ivf_code_map", "combine_mvals_m", "codebook_MKD"} <= set(obj):
        raise CheckpointError(f"{path} is a pairwise decoder (QINCo2's middle search stage, written by "
                              "train_pairwise_decoder), not a model: give it as --pairwise_decoder / "
                              "pairwise_decoder=, and the IVF model whose codes it decodes as the model")
    if not isinstance(obj, TorchModule):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a whole QINCo model "
                              "(a state dict or training checkpoint lacks the configuration and db_scale)")
    try:
        return model_from_torch_module(obj)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # a damaged file: name it
        raise CheckpointError(f"{path}: {e}") from None


def model_from_torch_module(module: TorchModule) -> AnyModel:
    """Our model from the stand-in of a reference module (see torch_pickle.load_pt)."""
    name = module.class_name
    if name == "PQ_QINCo":
        return _pq_from_module(module)
    if name not in _VARIANT_OF_CLASS:
        raise CheckpointError(f"the file holds a {module.torch_class}, not a QINCo model "
                              f"(one of {', '.join(sorted(_VARIANT_OF_CLASS))}, PQ_QINCo)")
    config = _config_from_module(module, _VARIANT_OF_CLASS[name])
    params = params_from_state_dict(config, module.state_dict())
    return QincoModel(config, params)


def _int_attr(module: TorchModule, name: str) -> int:
    v = module.get(name)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise CheckpointError(f"{module.class_name} attribute {name!r} is {v!r}, expected an integer")
    return int(v)


def _config_from_module(module: TorchModule, variant: str) -> QincoConfig:
    if "db_scale" not in module.attrs:
        raise CheckpointError(f"{module.class_name} has no db_scale attribute (the reference sets it "
                              "before saving; it cannot encode without it)")
    db_scale = module.get("db_scale")
    if isinstance(db_scale, np.ndarray) and db_scale.size == 1:
        db_scale = db_scale.reshape(())[()]
    if not isinstance(db_scale, (int, float, np.integer, np.floating)) or isinstance(db_scale, bool):
        raise CheckpointError(f"db_scale is {db_scale!r}, expected a number")
    sizes = {k: _int_attr(module, k) for k in ("d", "K", "L", "M", "h")}
    if variant == "ivf":
        sizes["K_IVF"] = _int_attr(module, "K_IVF")
    return QincoConfig(variant=variant, db_scale=float(db_scale), **sizes)


def _pq_from_module(module: TorchModule) -> PQQincoModel:
    subs = module.get("sub_quantizers")
    if not isinstance(subs, list):  # fall back on the registered sub-modules
        mods = module.get("_modules") or {}
        subs = [mods[k] for k in sorted((k for k in mods if k.startswith("sub_quantizer_")),
                                        key=lambda k: int(k.rsplit("_", 1)[1]))]
    if not subs or not all(isinstance(s, TorchModule) for s in subs):
        raise CheckpointError("PQ_QINCo without sub-quantizers")
    models = []
    for i, s in enumerate(subs):
        m = model_from_torch_module(s)
        if not isinstance(m, QincoModel) or m.config.is_ivf:
            raise CheckpointError(f"PQ_QINCo sub-quantizer {i} is a {s.class_name}, expected QINCo or QINCoLR")
        models.append(m)
    opq = (module.get("_parameters") or {}).get("opq_matrix")
    if opq is None:
        opq = module.get("opq_matrix")
    if opq is not None:
        opq = np.asarray(opq, np.float32)
    return PQQincoModel(tuple(models), opq)


def _load_directory(path: Path) -> AnyModel:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _not_a_checkpoint(path, f"{CONFIG_FILE} is not a qinco-jax model description")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: model format version {meta.get('version')!r}, this library reads "
                              f"version {FORMAT_VERSION}")
    kind = meta.get("kind")
    if kind not in ("qinco", "pq"):
        raise CheckpointError(f"{path}: unknown model kind {kind!r}")
    try:
        if kind == "qinco":
            config = QincoConfig(**meta["config"])
            target = {"model": _abstract_params(config)}
        else:
            configs = [QincoConfig(**c) for c in meta["subs"]]
            target = {"subs": {str(i): _abstract_params(c) for i, c in enumerate(configs)}}
            if meta.get("opq_shape"):
                target["opq"] = jax.ShapeDtypeStruct(tuple(meta["opq_shape"]), np.float32)
    except (KeyError, TypeError, ValueError) as e:  # ValueError: QincoConfig refusing a value
        raise CheckpointError(f"{path}: malformed {CONFIG_FILE} ({type(e).__name__}: {e})") from None
    tree = _restore(path / PARAMS_DIR, target)
    try:
        if kind == "qinco":
            return QincoModel(config, tree["model"])
        subs = tuple(QincoModel(c, tree["subs"][str(i)]) for i, c in enumerate(configs))
        return PQQincoModel(subs, tree.get("opq"))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _abstract_params(config: QincoConfig):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), param_shapes(config))


def _nonempty(tree):
    """The tree without its zero-size leaves (and the dicts they leave empty): orbax
    refuses to save zero-size arrays, which a model with M = 1 (no neural step) has."""
    if isinstance(tree, dict):
        kept = {k: _nonempty(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None}
    return tree if int(np.prod(tree.shape)) > 0 else None


def _restore(path: Path, target):
    import orbax.checkpoint as ocp

    if not path.is_dir():
        raise CheckpointError(f"{path}: missing parameter checkpoint")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.restore(path.absolute(), _nonempty(target))
    except Exception as e:  # orbax raises many kinds (ValueError, FileNotFoundError, tensorstore errors)
        raise CheckpointError(f"{path}: cannot restore parameters ({type(e).__name__}: {e})") from None
    found = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}

    def fill(key_path, leaf):
        key = jax.tree_util.keystr(key_path)
        return np.asarray(found[key], np.float32) if key in found else np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, target)


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def save_model(model: AnyModel, path: str | os.PathLike) -> None:
    """Write `model` to `path`, atomically: the reference's format if the name ends in
    `.pt`, else a qinco-jax model directory."""
    if not isinstance(model, (QincoModel, PQQincoModel)):
        raise TypeError(f"expected a QincoModel or PQQincoModel, got {type(model).__name__}")
    path = Path(path)
    if path.suffix == ".pt" and isinstance(model, QincoModel) and model.config.is_qinco2:
        with atomic_path(path) as tmp:
            qinco2_file.write_qinco2_pt(model, tmp, archive_name=path.stem)
        return
    if path.suffix == ".pt":
        writer = TorchWriter()
        root = torch_module_of(writer, model)
        with atomic_path(path) as tmp:
            torch_pickle.write_pt(tmp, writer, root, archive_name=path.stem)
        return
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; a .pt name saves in the reference format")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: refusing to replace a non-empty directory that is not a model directory")
    with atomic_directory(path) as tmp:
        _save_directory(model, tmp)


def _save_directory(model: AnyModel, path: Path) -> None:
    import orbax.checkpoint as ocp

    if isinstance(model, QincoModel):
        meta = {"kind": "qinco", "config": dataclasses.asdict(model.config), "description": model.describe()}
        tree = {"model": model.params}
    else:
        meta = {"kind": "pq", "subs": [dataclasses.asdict(s.config) for s in model.subs],
                "opq_shape": None if model.opq is None else list(model.opq.shape),
                "description": model.describe()}
        tree = {"subs": {str(i): s.params for i, s in enumerate(model.subs)}}
        if model.opq is not None:
            tree["opq"] = model.opq
    tree = jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((path / PARAMS_DIR).absolute(), _nonempty(tree))
        ckptr.wait_until_finished()
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def torch_module_of(writer: TorchWriter, model: AnyModel):
    """The pickled description of the reference module equal to `model`."""
    if isinstance(model, PQQincoModel):
        subs = [torch_module_of(writer, s) for s in model.subs]
        params = {} if model.opq is None else {"opq_matrix": writer.tensor(model.opq)}
        extra = {} if model.opq is not None else {"opq_matrix": None}
        return writer.module(("model_qinco", "PQ_QINCo"), params,
                             {f"sub_quantizer_{m}": s for m, s in enumerate(subs)},
                             db_scale=1, sub_quantizers=subs, **extra)
    c = model.config
    sd = state_dict_from_params(c, model.params)
    first = first_step_number(c)
    modules = {"codebook0": writer.embedding(sd["codebook0.weight"], frozen=c.is_ivf)}
    steps = []
    for m in range(first, first + c.num_steps):
        p = f"step{m}."
        if c.variant == "lowrank":
            concat = writer.sequential(writer.linear(sd[p + "MLPconcat.0.weight"]),
                                       writer.linear(sd[p + "MLPconcat.1.weight"]))
        else:
            concat = writer.linear(sd[p + "MLPconcat.weight"], sd[p + "MLPconcat.bias"])
        blocks = [writer.sequential(writer.linear(sd[f"{p}residual_block{l}.0.weight"]), writer.relu(),
                                    writer.linear(sd[f"{p}residual_block{l}.2.weight"]))
                  for l in range(c.L)]
        step_modules = {"codebook": writer.embedding(sd[p + "codebook.weight"]), "MLPconcat": concat}
        step_modules.update({f"residual_block{l}": b for l, b in enumerate(blocks)})
        step = writer.module(("model_qinco", "QINCoStep"), modules=step_modules,
                             d=c.d, K=c.K, L=c.L, h=c.h, residual_blocks=blocks)
        modules[f"step{m}"] = step
        steps.append(step)
    # Attributes in the order the reference's constructors set them.
    sizes = {"d": c.d, "K_IVF": c.K_IVF, "K": c.K} if c.is_ivf else {"d": c.d, "K": c.K}
    sizes.update(L=c.L, M=c.M, h=c.h)
    return writer.module(("model_qinco", _CLASS_OF_VARIANT[c.variant]), modules=modules, **sizes,
                         steps=steps, db_scale=TorchWriter.numpy_float32(c.db_scale))


# --------------------------------------------------------------------------------------
# faiss
# --------------------------------------------------------------------------------------


def to_faiss_qinco(model: QincoModel):
    """A faiss.QINCo with this model's weights (faiss's CPU implementation of QINCo).

    faiss.QINCo works in model units: divide inputs by `model.config.db_scale` (also
    stored as the Python attribute `db_scale` of the returned object) and multiply its
    reconstructions by it. QINCo-LR is converted by multiplying out the low-rank
    concat block (W1 W0, exact up to float rounding). faiss has no IVF step and no
    PQ-QINCo, so IVF and PQ models are refused."""
    import faiss

    if isinstance(model, PQQincoModel):
        raise CheckpointError("faiss has no PQ-QINCo: convert each sub-quantizer with to_faiss_qinco")
    c = model.config
    if c.is_ivf:
        raise CheckpointError("faiss.QINCo has no IVF step: an IVF-QINCo model cannot be converted "
                              "(search it with qinco-jax's IVF pipeline)")
    sd = state_dict_from_params(c, model.params)
    fq = faiss.QINCo(c.d, c.K, c.L, c.M, c.h)
    fq.codebook0.from_array(sd["codebook0.weight"])
    for m in range(1, c.M):
        p = f"step{m}."
        step = fq.get_step(m - 1)
        step.codebook.from_array(sd[p + "codebook.weight"])
        if c.variant == "lowrank":
            w = sd[p + "MLPconcat.1.weight"].astype(np.float64) @ sd[p + "MLPconcat.0.weight"].astype(np.float64)
            step.MLPconcat.from_array(np.ascontiguousarray(w, np.float32), np.zeros(c.d, np.float32))
        else:
            step.MLPconcat.from_array(sd[p + "MLPconcat.weight"], sd[p + "MLPconcat.bias"])
        for l in range(c.L):
            block = step.get_residual_block(l)
            block.linear1.from_array(sd[f"{p}residual_block{l}.0.weight"])
            block.linear2.from_array(sd[f"{p}residual_block{l}.2.weight"])
    fq.db_scale = float(c.db_scale)
    return fq
