"""The `.pt` reader under fuzzing (issue 13): every mutation of every fixture
checkpoint (tests/fixtures/**/*.pt, QINCo2 ones included) loads the same model or is
refused with CheckpointError: no other exception, no hang, no allocation sized by a
damaged field, no damaged model loaded silently, no code run. The long run is
bench/fuzz_pt.py."""

from __future__ import annotations

import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE_MODELS

from qinco_jax.formats import checkpoint
from qinco_jax.formats import torch_pickle
from qinco_jax.formats.torch_pickle import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fuzz_pt", ROOT / "bench" / "fuzz_pt.py")
fuzz_pt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_pt)

QINCO = FIXTURES / REFERENCE_MODELS["qinco"]


def test_fixtures_include_qinco2_checkpoints():
    names = {str(p.relative_to(FIXTURES)) for p in fuzz_pt.fixture_paths()}
    assert REFERENCE_MODELS["qinco"] in names and any(n.startswith("qinco2/") for n in names)


def test_fuzzed_checkpoints_load_the_same_model_or_are_refused(tmp_path):
    res = fuzz_pt.fuzz(cases=160, seed=0, time_limit=5.0, workdir=str(tmp_path))
    assert res["failures"] == [], res["failures"][:5]
    counts = res["counts"]
    # both families ran and mostly ended refused; raw damage never gives another model
    assert counts.get("raw:refused", 0) > 40 and counts.get("rezip:refused", 0) > 40, counts
    assert "raw:different" not in counts
    for fixture, outcomes in res["by_fixture"].items():  # every fixture, QINCo2's included, was fuzzed
        assert sum(outcomes.values()) >= 10 and outcomes.get("refused", 0) > 0, (fixture, outcomes)


QINCO2_FIXTURES = sorted((FIXTURES / "qinco2").glob("*.pt"))


@pytest.mark.parametrize("path", QINCO2_FIXTURES, ids=lambda p: p.name)
def test_qinco2_files_go_through_the_hardened_reader(tmp_path, path):
    """A QINCo2 file re-zipped intact loads the SAME model (every parameter, the
    normalisation included); one flipped bit of a tensor is caught by the CRC-32."""
    original = fuzz_pt.load_reference(path)[0]
    copy = tmp_path / path.name
    copy.write_bytes(fuzz_pt.rezip(fuzz_pt.read_entries(path.read_bytes())))
    assert fuzz_pt.same_model(fuzz_pt.loader_for(copy)(copy), original)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)  # the largest tensor
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0x04
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="Bad CRC-32"):
        fuzz_pt.loader_for(copy)(copy)


def test_same_model_compares_every_parameter():
    path = next(p for p in QINCO2_FIXTURES if p.name.startswith("qinco2_d32"))
    a, b = checkpoint.load_model(path), checkpoint.load_model(path)
    assert fuzz_pt.same_model(a, b)
    b.params["normalisation"]["std"] = np.asarray(b.params["normalisation"]["std"]) * 2
    assert not fuzz_pt.same_model(a, b)


def _entries():
    return fuzz_pt.read_entries(QINCO.read_bytes())


def _with_pickle(tmp_path, pkl: bytes) -> Path:
    entries = [(n, pkl if n.endswith("/data.pkl") else b) for n, b in _entries()]
    path = tmp_path / "m.pt"
    path.write_bytes(fuzz_pt.rezip(entries))
    return path


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = (b"\x80\x02cos\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little") +
            f"touch {marker}".encode() + b"\x85R.")
    with pytest.raises(CheckpointError, match="refusing to load global 'os.system'"):
        checkpoint.load_model(_with_pickle(tmp_path, evil))
    assert not marker.exists()


@pytest.mark.parametrize("opcodes", [
    b"X\xff\xff\xff\x7f",               # BINUNICODE of 2 GB
    b"\x8e" + b"\xff" * 7 + b"\x7f",    # BINBYTES8
    b"\x8b\xff\xff\xff\x7f",            # LONG4 of 2 GB
])
def test_a_length_field_never_sizes_an_allocation(tmp_path, opcodes):
    with pytest.raises(CheckpointError):
        torch_pickle.load_pt(_with_pickle(tmp_path, b"\x80\x02N" + opcodes + b"."))


def test_a_storage_flip_is_caught_by_the_crc(tmp_path):
    data = bytearray(QINCO.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 5] ^= 0x10  # one bit of a weight
    (tmp_path / "m.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="Bad CRC-32"):
        checkpoint.load_model(tmp_path / "m.pt")


def test_a_huge_memo_index_allocates_nothing(tmp_path):
    # LONG_BINPUT at index 4e9: the C unpickler would grow its memo array to that size
    path = _with_pickle(tmp_path, b"\x80\x02Nr\xff\xff\xff\xff.")
    assert torch_pickle.load_pt(path) is None


def test_build_cannot_change_the_allow_listed_functions(tmp_path):
    # BUILD on a global of the allow-list would otherwise set attributes of a function
    # shared by every later load.
    pkl = b"\x80\x02ccollections\nOrderedDict\n}X\x03\x00\x00\x00abc" + b"K\x01sb."
    with pytest.raises(CheckpointError, match="sets the state of a function"):
        torch_pickle.load_pt(_with_pickle(tmp_path, pkl))
    assert not hasattr(torch_pickle._ordered_dict, "abc")
    checkpoint.load_model(QINCO)  # later loads unaffected


def test_a_module_that_contains_itself_is_refused(tmp_path):
    # QINCo() whose _modules = {"a": itself}
    pkl = b"\x80\x02cmodel_qinco\nQINCo\n)\x81q\x00}X\x08\x00\x00\x00_modules}X\x01\x00\x00\x00ah\x00ssb."
    module = torch_pickle.load_pt(_with_pickle(tmp_path, pkl))
    with pytest.raises(CheckpointError, match="contains itself"):
        module.state_dict()


def test_module_tables_of_the_wrong_type_are_refused(tmp_path):
    # found by bench/fuzz_pt.py: _parameters keyed by a function (a swapped memo reference)
    pkl = (b"\x80\x02cmodel_qinco\nQINCo\n)\x81}X\x0b\x00\x00\x00_parameters}ccollections\nOrderedDict\nNssb.")
    module = torch_pickle.load_pt(_with_pickle(tmp_path, pkl))
    with pytest.raises(CheckpointError, match="_parameters is not a dict of names"):
        module.state_dict()


def test_a_malformed_dtype_state_is_refused(tmp_path):
    # found by bench/fuzz_pt.py: numpy's dtype.__setstate__ raised SystemError on it
    pkl = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f4K\x00K\x01\x87R(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffK\x05K\x00tb."
    with pytest.raises(CheckpointError, match="malformed state"):
        torch_pickle.load_pt(_with_pickle(tmp_path, pkl))
