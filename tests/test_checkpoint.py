"""Checkpoints: .pt and directory round trips, torch/faiss compatibility of what we write,
and refusal of unsafe or malformed files."""

from __future__ import annotations

import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE_MODELS, load_reference_outputs, require_torch

from qinco_jax.models import codec
from qinco_jax.formats.checkpoint import CheckpointError, load_model, save_model, to_faiss_qinco
from qinco_jax.config import QincoConfig
from qinco_jax.models.qinco import PQQincoModel, QincoModel
from qinco_jax.formats.torch_pickle import Global, PersistentId, Reduce, TorchWriter, load_pt, write_pt

ROOT = Path(__file__).resolve().parents[1]


def leaves(model):
    tree = ([s.params for s in model.subs], model.opq) if isinstance(model, PQQincoModel) else model.params
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def assert_same_model(a, b):
    assert type(a) is type(b)
    assert a.config == b.config
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and np.array_equal(x, y)


def rezip(src: Path, dst: Path, edit):
    """Copy a .pt archive, passing every (name, bytes) through edit (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = edit(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def replace_pickle(src: Path, dst: Path, new_pickle: bytes):
    rezip(src, dst, lambda n, d: new_pickle if n.endswith("/data.pkl") else d)


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(REFERENCE_MODELS))
def test_pt_to_directory_to_pt_keeps_everything(key, tmp_path):
    src = FIXTURES / REFERENCE_MODELS[key]
    model = load_model(src)
    save_model(model, tmp_path / "model")
    from_dir = load_model(tmp_path / "model")
    assert_same_model(model, from_dir)
    save_model(from_dir, tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt")
    assert_same_model(model, again)
    # The tensors we wrote are the reference's, under the same names, in the same order.
    ours, theirs = load_pt(tmp_path / "model.pt"), load_pt(src)
    assert ours.torch_class == theirs.torch_class
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert all(np.array_equal(sd_ours[n], sd_theirs[n]) for n in sd_theirs)


def test_written_pt_has_torch_layout(tmp_path):
    save_model(load_model(FIXTURES / REFERENCE_MODELS["qinco"]), tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as zf, open(tmp_path / "m.pt", "rb") as f:
        names = zf.namelist()
        assert names[0] == "m/data.pkl" and "m/byteorder" in names and "m/version" in names
        assert zf.read("m/byteorder") == b"little"
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0  # torch's alignment
        assert zf.read("m/data.pkl")[:2] == b"\x80\x02"  # protocol 2, like torch.save


def test_directory_save_is_atomic_and_replaces(tmp_path):
    a = load_model(FIXTURES / REFERENCE_MODELS["qinco"])
    b = load_model(FIXTURES / REFERENCE_MODELS["qinco_lr"])
    save_model(a, tmp_path / "m")
    save_model(b, tmp_path / "m")
    assert_same_model(load_model(tmp_path / "m"), b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="non-empty directory"):
        save_model(a, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def random_model(config: QincoConfig, seed: int) -> QincoModel:
    """A model with random parameters of the right shapes (cheaper than QincoModel.init,
    which compiles its initialisers)."""
    from qinco_jax.models.qinco import param_shapes

    rs = np.random.RandomState(seed)
    return QincoModel(config, jax.tree.map(lambda s: rs.randn(*s.shape).astype(np.float32), param_shapes(config)))


def test_fresh_model_round_trip_all_variants(tmp_path):
    """Models built here (M = 1 included) survive both formats."""
    configs = [QincoConfig(d=8, K=4, M=3, L=1, h=6, db_scale=2.5),
               QincoConfig(d=8, K=4, M=2, L=0, h=5, variant="lowrank", db_scale=0.75),
               QincoConfig(d=8, K=4, M=2, L=2, h=6, variant="ivf", K_IVF=7),
               QincoConfig(d=8, K=4, M=1, L=1, h=6)]
    for i, c in enumerate(configs):
        m = random_model(c, i)
        for name in (f"m{i}.pt", f"m{i}"):
            save_model(m, tmp_path / name)
            assert_same_model(load_model(tmp_path / name), m)
    pq = PQQincoModel((random_model(configs[0], 5), random_model(configs[1], 6)), None)
    for name in ("pq.pt", "pq"):
        save_model(pq, tmp_path / name)
        back = load_model(tmp_path / name)
        assert back.opq is None and all(x.config == y.config for x, y in zip(back.subs, pq.subs))


def test_directory_with_bad_model_json_names_it(tmp_path):
    import json

    save_model(random_model(QincoConfig(d=8, K=4, M=2, L=1, h=6), 0), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["config"]["K"] = 0
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"m: malformed model.json \(ValueError: K must be"):
        load_model(tmp_path / "m")


# --------------------------------------------------------------------------------------
# What torch and faiss make of our files
# --------------------------------------------------------------------------------------

STUB_MODULE = """
import torch
class QINCoStep(torch.nn.Module): pass
class QINCo(torch.nn.Module): pass
class QINCoLR(QINCo): pass
class IVFQINCo(QINCo): pass
class PQ_QINCo(torch.nn.Module): pass
"""


@pytest.fixture
def torch_with_stub_module(tmp_path, monkeypatch):
    torch = require_torch()
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "model_qinco.py").write_text(STUB_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "stub"))
    monkeypatch.delitem(sys.modules, "model_qinco", raising=False)
    return torch


@pytest.mark.parametrize("key", sorted(REFERENCE_MODELS))
def test_torch_loads_our_pt_as_the_reference_class(key, tmp_path, torch_with_stub_module):
    torch = torch_with_stub_module
    save_model(load_model(FIXTURES / REFERENCE_MODELS[key]), tmp_path / "ours.pt")
    ours = torch.load(tmp_path / "ours.pt", weights_only=False)
    theirs = torch.load(FIXTURES / REFERENCE_MODELS[key], weights_only=False, map_location="cpu")
    assert type(ours) is type(theirs) and type(ours).__module__ == "model_qinco"
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert all(torch.equal(sd_ours[n], sd_theirs[n]) for n in sd_theirs)
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in theirs.parameters()]
    subs = ours.sub_quantizers if key == "pq_qinco" else [ours]
    for q, q_ref in zip(subs, theirs.sub_quantizers if key == "pq_qinco" else [theirs]):
        assert (q.d, q.K, q.L, q.M, q.h) == (q_ref.d, q_ref.K, q_ref.L, q_ref.M, q_ref.h)
        assert type(q.db_scale) is np.float32 and q.db_scale == q_ref.db_scale
        assert q.steps[0] is getattr(q, "step0" if key == "ivf_qinco" else "step1")  # shared, as in torch
        assert q.steps[0].residual_blocks[0] is q.steps[0].residual_block0


def test_our_reader_agrees_with_torch_on_the_fixtures(torch_with_stub_module):
    torch = torch_with_stub_module
    for name in [*REFERENCE_MODELS.values(), "ivf_qinco_d32_IVF512_M4_K256_L1_h32.pt"]:
        sd_torch = torch.load(FIXTURES / name, weights_only=False, map_location="cpu").state_dict()
        sd_ours = load_pt(FIXTURES / name).state_dict()
        assert list(sd_ours) == list(sd_torch)
        assert all(np.array_equal(sd_ours[n], sd_torch[n].numpy()) for n in sd_torch)


def faiss_decode(fq, codes: np.ndarray, d: int) -> np.ndarray:
    import faiss

    codes = np.ascontiguousarray(codes, dtype=np.int32)
    out = fq.decode(faiss.Int32Tensor2D(codes.shape[0], codes.shape[1], faiss.swig_ptr(codes)))
    return faiss.rev_swig_ptr(out.data(), codes.shape[0] * d).reshape(-1, d).copy()


def test_faiss_accepts_our_written_pt(tmp_path, torch_with_stub_module):
    import faiss

    torch = torch_with_stub_module
    model = load_model(FIXTURES / REFERENCE_MODELS["qinco"])
    save_model(model, tmp_path / "ours.pt")
    fq = faiss.QINCo(torch.load(tmp_path / "ours.pt", weights_only=False))
    codes = load_reference_outputs()["qinco_codes"]
    ours = codec.decode(model, codes) / np.float32(model.config.db_scale)
    np.testing.assert_allclose(faiss_decode(fq, codes, model.d), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["qinco", "qinco_lr"])
def test_to_faiss_qinco_decodes_like_us(key):
    model = load_model(FIXTURES / REFERENCE_MODELS[key])
    fq = to_faiss_qinco(model)
    assert (fq.d, fq.K, fq.L, fq.M, fq.h) == (32, 16, 2, 4, 32)
    ref = load_reference_outputs()
    got = faiss_decode(fq, ref[f"{key}_codes"], model.d) * np.float32(fq.db_scale)
    rel = np.linalg.norm(got - ref[f"{key}_decoded"]) / np.linalg.norm(ref[f"{key}_decoded"])
    assert rel < 1e-5


def test_to_faiss_qinco_refuses_ivf_and_pq():
    with pytest.raises(CheckpointError, match="no IVF step"):
        to_faiss_qinco(load_model(FIXTURES / REFERENCE_MODELS["ivf_qinco"]))
    with pytest.raises(CheckpointError, match="PQ-QINCo"):
        to_faiss_qinco(load_model(FIXTURES / REFERENCE_MODELS["pq_qinco"]))


# --------------------------------------------------------------------------------------
# Unsafe and malformed files
# --------------------------------------------------------------------------------------


def system_call_pickle(module: str, name: str, command: str) -> bytes:
    """Protocol-2 pickle of `module.name(command)` (GLOBAL + REDUCE)."""
    cmd = command.encode()
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(cmd)) + cmd
            + b"\x85R.")


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("subprocess", "getoutput")])
def test_code_execution_is_refused(module, name, tmp_path):
    marker = tmp_path / "pwned"
    payload = system_call_pickle(module, name, f"touch {marker}")
    bad = tmp_path / "bad.pt"
    replace_pickle(FIXTURES / REFERENCE_MODELS["qinco"], bad, payload)
    with pytest.raises(CheckpointError, match=rf"refusing to load global '{module}\.{name}'"):
        load_model(bad)
    assert not marker.exists()
    # The payload is live: a plain unpickler (in a child process) does run it.
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads({payload!r})"], check=True)
    assert marker.exists()


def test_code_execution_nested_in_a_valid_module_is_refused(tmp_path):
    """The malicious call hidden as the db_scale of an otherwise genuine model."""
    marker = tmp_path / "pwned"
    model = load_model(FIXTURES / REFERENCE_MODELS["qinco"])
    from qinco_jax.formats.checkpoint import torch_module_of

    writer = TorchWriter()
    root = torch_module_of(writer, model)
    root.state["db_scale"] = Reduce(Global("os", "system"), (f"touch {marker}",))
    write_pt(tmp_path / "bad.pt", writer, root)
    with pytest.raises(CheckpointError, match="'os.system'"):
        load_model(tmp_path / "bad.pt")
    assert not marker.exists()


def test_db_scale_under_numpy2_scalar_path(tmp_path):
    src = FIXTURES / REFERENCE_MODELS["qinco"]
    old, new = b"cnumpy.core.multiarray\nscalar\n", b"cnumpy._core.multiarray\nscalar\n"

    def edit(name, data):
        if name.endswith("/data.pkl"):
            assert data.count(old) == 1
            return data.replace(old, new)
        return data

    rezip(src, tmp_path / "np2.pt", edit)
    assert load_model(tmp_path / "np2.pt").config == load_model(src).config


def test_truncated_file(tmp_path):
    data = (FIXTURES / REFERENCE_MODELS["qinco"]).read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(tmp_path / "half.pt")
    assert str(tmp_path / "half.pt") in str(e.value)


def test_corrupted_tensor_bytes(tmp_path):
    src = FIXTURES / REFERENCE_MODELS["qinco"]
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("qinco_d32_M4_K16_L2_h32/data/2")
    data[info.header_offset + 200] ^= 0xFF  # inside the tensor bytes: the CRC no longer matches
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "bad.pt")


def test_files_of_the_wrong_kind(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "random.pt").write_bytes(np.random.RandomState(0).bytes(1000))
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as zf:
        zf.writestr("archive/data/0", b"\0" * 16)
    (tmp_path / "legacy.pt").write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + b"\0" * 100)
    (tmp_path / "emptydir").mkdir()
    cases = {
        "x.npy": "not a QINCo checkpoint.*expected a .pt file or a qinco-jax model directory",
        "random.pt": "not a QINCo checkpoint",
        "nopkl.pt": "without a data.pkl",
        "legacy.pt": "legacy .*re-save with torch>=1.6",
        "emptydir": "not a QINCo checkpoint.*without model.json",
        "missing.pt": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_model(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_state_dict_is_not_a_model(tmp_path):
    writer = TorchWriter()
    write_pt(tmp_path / "sd.pt", writer, {"codebook0.weight": writer.tensor(np.ones((4, 2)))})
    assert np.array_equal(load_pt(tmp_path / "sd.pt")["codebook0.weight"], np.ones((4, 2), np.float32))
    with pytest.raises(CheckpointError, match="not a whole QINCo model"):
        load_model(tmp_path / "sd.pt")


@pytest.mark.parametrize("value", [2.5, 3, None])
def test_db_scale_as_python_number_or_missing(value, tmp_path):
    """`train_qinco.py --db_scale X` stores a Python float; without db_scale the
    reference cannot encode, and neither do we."""
    from qinco_jax.formats.checkpoint import torch_module_of

    writer = TorchWriter()
    root = torch_module_of(writer, load_model(FIXTURES / REFERENCE_MODELS["qinco"]))
    if value is None:
        del root.state["db_scale"]
    else:
        root.state["db_scale"] = value
    write_pt(tmp_path / "m.pt", writer, root)
    if value is None:
        with pytest.raises(CheckpointError, match="no db_scale"):
            load_model(tmp_path / "m.pt")
    else:
        assert load_model(tmp_path / "m.pt").config.db_scale == value


def test_shape_mismatch_names_the_tensor(tmp_path):
    """A module whose attributes disagree with its tensors (M says 5, 3 steps stored)."""
    model = load_model(FIXTURES / REFERENCE_MODELS["qinco"])
    from qinco_jax.formats.checkpoint import torch_module_of

    writer = TorchWriter()
    root = torch_module_of(writer, model)
    root.state["M"] = 5
    write_pt(tmp_path / "bad.pt", writer, root)
    with pytest.raises(CheckpointError, match="step4"):
        load_model(tmp_path / "bad.pt")


# --------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------


def test_convert_cli(tmp_path, capsys):
    from qinco_jax.cli import convert as convert_checkpoint

    convert_checkpoint.main(["--model", str(FIXTURES / REFERENCE_MODELS["qinco_lr"]),
                             "--o", str(tmp_path / "lr"), "--check", "--nvec", "64"])
    out = capsys.readouterr().out
    assert "QINCo-LR d=32 M=4" in out and "codes equal: 100.00%" in out
    assert_same_model(load_model(tmp_path / "lr"), load_model(FIXTURES / REFERENCE_MODELS["qinco_lr"]))
    with pytest.raises(SystemExit) as e:
        from qinco_jax.cli import run_main

        run_main(convert_checkpoint.main, ["--model", str(tmp_path / "nothing.pt"), "--o", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "no such file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Tensor rebuilding
# --------------------------------------------------------------------------------------


def storage_tensor(writer, storage: np.ndarray, storage_type: str, offset, size, stride, location="cuda:0"):
    """A tensor over an arbitrary storage, as torch pickles views (offset, strides)."""
    key = str(len(writer.storages))
    writer.storages.append(storage)
    pid = PersistentId(("storage", Global("torch", storage_type), key, location, int(storage.size)))
    return Reduce(Global("torch._utils", "_rebuild_tensor_v2"), (pid, offset, size, stride, False,
                                                                 writer.ordered_dict()))


def test_tensor_dtypes_offsets_and_strides(tmp_path):
    import ml_dtypes

    writer = TorchWriter()
    base = np.arange(24, dtype=np.float32)
    tensors = {
        # a transposed (3, 4) view starting at element 2 of a float16 storage
        "half_t": storage_tensor(writer, base.astype("<f2"), "HalfStorage", 2, (3, 4), (1, 5)),
        "bf16": storage_tensor(writer, base.astype(ml_dtypes.bfloat16), "BFloat16Storage", 0, (2, 3), (3, 1)),
        "long": storage_tensor(writer, np.arange(10, dtype="<i8"), "LongStorage", 4, (3,), (2,)),
        "shared": storage_tensor(writer, base, "FloatStorage", 0, (24,), (1,)),
    }
    write_pt(tmp_path / "t.pt", writer, tensors)
    got = load_pt(tmp_path / "t.pt")
    expected_half = np.lib.stride_tricks.as_strided(base[2:], (3, 4), (4, 20)).astype(np.float16)
    assert got["half_t"].dtype == np.float16 and np.array_equal(got["half_t"], expected_half)
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and np.array_equal(got["bf16"].astype(np.float32),
                                                                       base[:6].reshape(2, 3))
    assert got["long"].dtype == np.int64 and got["long"].tolist() == [4, 6, 8]
    assert np.array_equal(got["shared"], base)


def test_tensor_reading_past_its_storage_is_refused(tmp_path):
    writer = TorchWriter()
    root = {"w": storage_tensor(writer, np.zeros(6, np.float32), "FloatStorage", 2, (2, 3), (3, 1))}
    write_pt(tmp_path / "t.pt", writer, root)
    with pytest.raises(CheckpointError, match="past the end of its storage"):
        load_pt(tmp_path / "t.pt")
