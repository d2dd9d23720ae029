"""Index building at scale (qinco_jax.search.ondisk): codes added part by part in
bounded chunks, inverted lists on disk, several processes' shards merged on disk into an
index that searches exactly as the one-process in-memory index; every bad input (parts
missing, duplicated, overlapping or of another model; shards missing, overlapping or of
another build; an `.ivfdata` missing or truncated) refused with the file named, nothing
already written overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from conftest import FIXTURES
from qinco_jax import distributed
from qinco_jax.cli import qinco2_search, run_config
from qinco_jax.formats import checkpoint, code_parts
from qinco_jax.models import codec
from qinco_jax.search import index as ivf
from qinco_jax.search import ondisk

ROOT = Path(__file__).resolve().parents[1]
K16_MODEL = FIXTURES / "qinco2" / "ivf_qinco2_d32_IVF64_M4_K16_L2_de48_dh64_A8_B8.pt"
KEY = "IVF64,RQ4x4_Nqint8"
quiet = lambda _m: None  # noqa: E731


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The K=16 IVF64 QINCo2 model, codes of 3000 training and the 10000 database
    vectors, the database codes as a 3-part encoded set."""
    tmp = tmp_path_factory.mktemp("ondisk")
    model = checkpoint.load_model(K16_MODEL)
    xt = np.load(FIXTURES / "ivf_xt.npy")[:3000]
    xb = np.load(FIXTURES / "ivf_xb.npy")
    xt_codes = codec.encode(model, xt).astype(np.int64)
    xb_codes = codec.encode(model, xb).astype(np.int64)
    np.save(tmp / "c.npy", ivf.ivf_centroids(model))
    np.save(tmp / "xt.npy", xt)
    np.save(tmp / "xt_codes.npy", xt_codes)
    code_parts.write_code_parts(tmp / "db.npz", xb_codes, K=16, M=4, D=32, n_parts=3)
    trained, _ = ivf.train_index_on_codes(ivf.ivf_centroids(model), xt, xt_codes, KEY, 16, log=quiet)
    common = [f"ivf_centroids={tmp / 'c.npy'}", f"trainset={tmp / 'xt.npy'}",
              f"encoded_trainset={tmp / 'xt_codes.npy'}", "ds.valset=500", "K=16", "verbose=false",
              f"search.index_key={KEY}"]
    return dict(tmp=tmp, model=model, xt=xt, xt_codes=xt_codes, xb_codes=xb_codes, trained=trained, common=common)


def lists_of(index) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, codes) of every inverted list, in stored order."""
    out, inv = [], faiss.extract_index_ivf(index).invlists
    for l in range(index.nlist):
        n = inv.list_size(l)
        ids = faiss.rev_swig_ptr(inv.get_ids(l), n).copy() if n else np.zeros(0, np.int64)
        codes = faiss.rev_swig_ptr(inv.get_codes(l), n * index.code_size).copy() if n else np.zeros(0, np.uint8)
        out.append((ids, codes))
    return out


def assert_same_lists(a, b):
    assert a.ntotal == b.ntotal
    for (ia, ca), (ib, cb) in zip(lists_of(a), lists_of(b)):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ca, cb)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def build_cfg(setup, output, *extra):
    return run_config.parse_run_args(["task=build_index", *setup["common"], f"encoded_db={setup['tmp'] / 'db.npz'}",
                                      f"output={output}", *extra])


# --------------------------------------------------------------------------------------
# Same index, whatever the processes and the storage
# --------------------------------------------------------------------------------------


def test_two_process_ondisk_build_searches_as_the_in_memory_build(setup, tmp_path):
    """run.py task=build_index as it is launched: two processes (QINCO_PROCESS_INDEX /
    COUNT) with ondisk=true, against one process in memory: the same lists entry for
    entry, the same faiss results, the same QINCo search results (recalls)."""
    memory = qinco2_search.build_index(build_cfg(setup, tmp_path / "mem.faissindex"), log=quiet)
    disk = tmp_path / "disk" / "db.faissindex"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QINCO_PROCESS", "SLURM_", "OMPI_", "JAX_"))}
    env["PYTHONPATH"] = str(ROOT)
    common = [c for c in setup["common"] if c != "verbose=false"]
    cmd = [sys.executable, str(ROOT / "run.py"), "cpu=true", "task=build_index", *common,
           f"encoded_db={setup['tmp'] / 'db.npz'}", f"output={disk}", "ondisk=true"]
    procs = [subprocess.Popen(cmd, env={**env, distributed.PROCESS_INDEX_ENV: str(i),
                                        distributed.PROCESS_COUNT_ENV: "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("merged 2 shard(s), 10000 vectors" in log for log in logs) == 1, logs
    # the index, its lists beside it, nothing else left (shards, temporaries, the lock)
    assert sorted(p.name for p in disk.parent.iterdir()) == ["db.faissindex", "db.ivfdata"]

    index = ivf.read_index(disk)
    assert ondisk.ondisk_lists(index) is not None and ondisk.ondisk_lists(memory) is None
    assert_same_lists(index, memory)
    xq = np.load(FIXTURES / "ivf_xq.npy")
    for ix in (index, memory):
        ix.nprobe = 8
    np.testing.assert_array_equal(index.search(xq, 20)[1], memory.search(xq, 20)[1])

    def search(path):
        return qinco2_search.search(run_config.parse_run_args(
            ["task=search", f"model={K16_MODEL}", f"index={path}", f"queries={FIXTURES / 'ivf_xq.npy'}",
             f"queries_gt={FIXTURES / 'ivf_gt.npy'}", "search.nprobe=[4,16]", "search.nshort=[10,50]",
             "search.nthreads=2"]), log=quiet)

    a, b = search(tmp_path / "mem.faissindex"), search(disk)
    assert [r["parameters"] for r in a] == [r["parameters"] for r in b] and a
    assert [r["recalls"] for r in a] == [r["recalls"] for r in b]
    assert max(r["recalls"]["10"] for r in a) > 0.3  # a real search (K=16 codes), not two empty ones
    # the library's QincoIndex opens it as it opens the in-memory one: the same results;
    # its memory-mapped lists are read-only
    from qinco_jax.search import QincoIndex

    mem_q, disk_q = (QincoIndex.read(p, setup["model"]) for p in (tmp_path / "mem.faissindex", disk))
    for q in (mem_q, disk_q):
        q.nprobe, q.nshort = 8, 50
    (Da, Ia), (Db, Ib) = mem_q.search(xq, 10), disk_q.search(xq, 10)
    np.testing.assert_array_equal(Ia, Ib)
    np.testing.assert_array_equal(Da, Db)
    with pytest.raises(ValueError, match="opened read-only"):
        disk_q.add_codes(setup["xb_codes"][:5])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_build_on_two_jax_distributed_processes(setup, tmp_path):
    """run.py task=build_index ondisk=true under jax.distributed (a coordinator address,
    as a cluster launcher gives): process 0 merges after both shards are written."""
    memory = qinco2_search.build_index(build_cfg(setup, tmp_path / "mem.faissindex"), log=quiet)
    out = tmp_path / "dist" / "dist.faissindex"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QINCO_PROCESS", "SLURM_", "OMPI_", "JAX_"))}
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES="2", PYTHONPATH=str(ROOT))
    common = [c for c in setup["common"] if c != "verbose=false"]
    cmd = [sys.executable, str(ROOT / "run.py"), "cpu=true", "task=build_index", *common,
           f"encoded_db={setup['tmp'] / 'db.npz'}", f"output={out}", "ondisk=true"]
    procs = [subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "merged 2 shard(s), 10000 vectors" in logs[0] and "merged" not in logs[1]
    assert_same_lists(ivf.read_index(out), memory)
    assert sorted(p.name for p in out.parent.iterdir()) == ["dist.faissindex", "dist.ivfdata"]


@pytest.mark.parametrize("processes,chunk_rows", [(1, 10_000), (3, 1000), (5, 5000)])
def test_shards_merged_on_disk_hold_the_in_memory_lists(setup, tmp_path, processes, chunk_rows):
    """Any number of processes (joined by a barrier, as under jax.distributed; with 5
    processes and 3 chunks two shards are empty) and any chunk size: the merged lists
    are the one-process in-memory lists, entry for entry."""
    sources, header = ondisk.encoded_set_sources(setup["tmp"] / "db.npz")
    ondisk.check_sources(sources, setup["trained"], header=header)
    memory = ondisk.build_in_memory(faiss.clone_index(setup["trained"]), sources, chunk_rows=chunk_rows, log=quiet)
    path = tmp_path / "x.faissindex"
    barrier = threading.Barrier(processes)
    merged, errors = [None] * processes, []

    def process(p):
        try:
            merged[p] = ondisk.build_ondisk(setup["trained"], sources, path, process_index=p,
                                            process_count=processes, barrier=lambda _name: barrier.wait(),
                                            chunk_rows=chunk_rows, log=quiet)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(p,)) for p in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert merged[0] is not None and all(m is None for m in merged[1:])
    assert_same_lists(merged[0], memory)
    assert_same_lists(ivf.read_index(path), memory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.faissindex", "x.ivfdata"]


def test_a_merge_under_way_is_left_to_its_process(setup, tmp_path):
    """Without a barrier the process that finds every shard written merges; a lock
    file beside the index makes it one process."""
    sources = ondisk.encoded_set_sources(setup["tmp"] / "db.npz")[0]
    path = tmp_path / "x.faissindex"
    logged = []
    assert ondisk.build_ondisk(setup["trained"], sources, path, process_index=0, process_count=2,
                               log=logged.append) is None
    assert any("still being built" in m for m in logged)
    ondisk.build_shard(setup["trained"], sources, path, process_index=1, process_count=2, log=quiet)
    lock = tmp_path / "x.merge_lock"
    lock.write_text("12345")
    assert ondisk.merge_if_last(path, 2, log=logged.append) is None
    assert "another process is merging" in logged[-1] and not path.exists()
    lock.unlink()
    merged = ondisk.merge_if_last(path, 2, log=quiet)
    assert merged.ntotal == 10000 and not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.faissindex", "x.ivfdata"]


def test_process_shares_tile_the_chunks():
    sources = [ondisk.array_source(np.zeros((n, 2), np.int64), f"s{i}") for i, n in enumerate([7, 0, 5, 9])]
    chunks = ondisk.plan_chunks(sources, 3)
    assert [(c.source, c.start, c.end, c.first_id) for c in chunks[:4]] == \
        [(0, 0, 3, 0), (0, 3, 6, 3), (0, 6, 7, 6), (2, 0, 3, 7)]
    for count in (1, 2, 3, 4, 20):
        shares = [ondisk.process_share(chunks, p, count) for p in range(count)]
        assert [c for s in shares for c in s] == chunks  # contiguous, in order, each chunk once
    sizes = [sum(c.end - c.start for c in ondisk.process_share(chunks, p, 2)) for p in range(2)]
    assert abs(sizes[0] - sizes[1]) <= 3


def test_parts_are_read_in_bounded_chunks(setup, monkeypatch):
    """Building reads no part whole: each read is one chunk of rows."""
    sizes, real = [], code_parts.iter_npz_rows

    def spy(path, ranges):
        for rows in real(path, ranges):
            sizes.append(len(rows))
            yield rows

    monkeypatch.setattr(code_parts, "iter_npz_rows", spy)
    sources, _ = ondisk.encoded_set_sources(setup["tmp"] / "db.npz")
    ondisk.build_in_memory(faiss.clone_index(setup["trained"]), sources, chunk_rows=512, log=quiet)
    assert max(sizes) == 512 and sum(sizes) == 10000


def test_search_ivf_adds_on_two_processes_then_searches_the_ondisk_index(setup, tmp_path, monkeypatch):
    """search_ivf.py --todo add --ondisk called as process 1 then process 0 of 2 (the
    second one merges), then --todo search on the on-disk index: the results of the
    one-process in-memory build."""
    from qinco_jax.cli import index as search_ivf

    db = tmp_path / "db"
    db.mkdir()
    for role, key in (("learn", "xt"), ("base", "xb"), ("query", "xq"), ("gt", "gt")):
        np.save(db / f"{role}.npy", setup["xt"] if key == "xt" else np.load(FIXTURES / f"ivf_{key}.npy"))
    half = 6000
    np.save(tmp_path / "xb0.npy", setup["xb_codes"][:half])
    np.save(tmp_path / "xb1.npy", setup["xb_codes"][half:])
    common = ["--db", str(db), "--model", str(K16_MODEL), "--nprobe", "4", "16", "--nshort", "10", "50",
              "--nthreads", "2", "--index_key", KEY, "--add_bs", "2500",
              "--xb_codes", str(tmp_path / "xb0.npy"), str(tmp_path / "xb1.npy")]
    np.save(tmp_path / "xt_codes.npy", setup["xt_codes"])
    search_ivf.main(common + ["--todo", "train", "add", "search", "--nt", "3000",
                              "--xt_codes", str(tmp_path / "xt_codes.npy"),
                              "--trained_index", str(tmp_path / "trained.faissindex"),
                              "--index", str(tmp_path / "mem.faissindex"), "--json", str(tmp_path / "mem.json")])
    disk = tmp_path / "disk.faissindex"
    for p in (1, 0):
        monkeypatch.setenv(distributed.PROCESS_INDEX_ENV, str(p))
        monkeypatch.setenv(distributed.PROCESS_COUNT_ENV, "2")
        search_ivf.main(common + ["--todo", "add", "--ondisk", "--trained_index",
                                  str(tmp_path / "trained.faissindex"), "--index", str(disk)])
    with pytest.raises(Exception, match="only --todo add --ondisk --trained_index"):
        search_ivf.main(common + ["--todo", "add", "search", "--ondisk", "--index", str(disk),
                                  "--trained_index", str(tmp_path / "trained.faissindex")])
    monkeypatch.delenv(distributed.PROCESS_INDEX_ENV)
    monkeypatch.delenv(distributed.PROCESS_COUNT_ENV)
    assert (tmp_path / "disk.ivfdata").is_file()
    assert_same_lists(ivf.read_index(disk), ivf.read_index(tmp_path / "mem.faissindex"))
    search_ivf.main(common + ["--todo", "search", "--index", str(disk), "--json", str(tmp_path / "disk.json")])
    mem, dsk = (json.loads((tmp_path / f).read_text())["results"] for f in ("mem.json", "disk.json"))
    assert [r["recalls"] for r in mem] == [r["recalls"] for r in dsk] and len(mem) == 4
    # a QINCo2 encoded set (header + 3 parts) as --xb_codes: the same entries (chunked
    # by part, so in another order inside the lists)
    search_ivf.main(common[:-2] + [str(setup["tmp"] / "db.npz"), "--todo", "add", "--trained_index",
                                   str(tmp_path / "trained.faissindex"), "--index", str(tmp_path / "parts.faissindex")])
    for (ia, ca), (ib, cb) in zip(lists_of(ivf.read_index(tmp_path / "parts.faissindex")),
                                  lists_of(ivf.read_index(tmp_path / "mem.faissindex"))):
        np.testing.assert_array_equal(np.sort(ia), np.sort(ib))
    # the same file twice is refused, naming it
    with pytest.raises(ValueError, match=r"xb0\.npy and .*xb0\.npy are the same file"):
        search_ivf.main(common[:-2] + [str(tmp_path / "xb0.npy"), str(tmp_path / "xb0.npy"), "--todo", "add",
                                       "--trained_index", str(tmp_path / "trained.faissindex")])


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def _copy_set(setup, folder: Path) -> Path:
    folder.mkdir()
    for p in setup["tmp"].glob("db*.npz"):
        shutil.copy(p, folder / p.name)
    return folder / "db.npz"


def test_bad_parts_at_build_are_refused_naming_the_file_and_nothing_is_overwritten(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    good = out / "db.faissindex"
    qinco2_search.build_index(build_cfg(setup, good, "ondisk=true"), log=quiet)
    before = snapshot(out)

    def build(encoded, match, *extra):
        cfg = run_config.parse_run_args(["task=build_index", *setup["common"], f"encoded_db={encoded}",
                                         f"output={good}", *extra])
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            qinco2_search.build_index(cfg, log=quiet)
        assert snapshot(out) == before  # the index built before is untouched, nothing added beside it

    missing = _copy_set(setup, tmp_path / "missing")
    code_parts.part_path(missing, 1).unlink()
    build(missing, r"db\.part_1\.npz missing", "ondisk=true")
    duplicated = _copy_set(setup, tmp_path / "duplicated")
    code_parts.part_path(duplicated, 2).unlink()
    xb = setup["xb_codes"]
    code_parts.write_code_parts(duplicated, np.concatenate([xb[:5000], xb[:5000]]), K=16, M=4, D=32, n_parts=2)
    build(duplicated, r"db\.part_1\.npz holds the same codes as .*db\.part_0\.npz")
    overlapping = _copy_set(setup, tmp_path / "overlapping")  # part 1 rewritten with a row of part 2
    code_parts.write_code_part(overlapping, 1, [xb[3333:6667]], 5, 3334)
    build(overlapping, r"db\.part_1\.npz holds 3334 codes.*overlap", "ondisk=true")
    stale = _copy_set(setup, tmp_path / "stale")  # a 4th part left over from another split
    shutil.copy(code_parts.part_path(stale, 0), code_parts.part_path(stale, 3))
    build(stale, r"db\.part_3\.npz exists too")
    other = _copy_set(setup, tmp_path / "other")  # parts of a K=256 model
    code_parts.write_code_header(other, code_parts.CodeFileHeader(3, 256, 4, 32))
    build(other, r"other/db\.npz: its header says K=256.*another model", "ondisk=true")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((10, 6), np.int64))
    build(wide, r"wide\.npy has 6 columns")


def _shards(setup, folder: Path, sources=None):
    sources = sources or ondisk.encoded_set_sources(setup["tmp"] / "db.npz")[0]
    path = folder / "x.faissindex"
    return path, [ondisk.build_shard(setup["trained"], sources, path, process_index=p, process_count=2,
                                     chunk_rows=2000, log=quiet) for p in range(2)]


def test_bad_shards_at_merge_are_refused_naming_the_file(setup, tmp_path):
    path, files = _shards(setup, tmp_path)
    path.write_bytes(b"an index written before")
    ondisk.ivfdata_path(path).write_bytes(b"its lists")

    def merge(match):
        before = snapshot(tmp_path)
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            ondisk.merge_shards(path, 2, log=quiet)
        assert snapshot(tmp_path) == before  # the files written before (and the shards) untouched
        assert path.read_bytes() == b"an index written before"

    manifest = json.loads(files[1].manifest.read_text())
    files[1].manifest.rename(tmp_path / "away.json")
    merge(r"shard 1 of 2 is missing: .*x\.shard1of2\.json not found")
    (tmp_path / "away.json").rename(files[1].manifest)
    overlapping = dict(manifest, rows=[manifest["rows"][0] - 100, manifest["rows"][1]])
    files[1].manifest.write_text(json.dumps(overlapping))
    merge(r"x\.shard1of2\.json holds database rows \[\d+, 10000\).*overlap")
    gap = dict(manifest, rows=[manifest["rows"][0] + 100, manifest["rows"][1]])
    files[1].manifest.write_text(json.dumps(gap))
    merge(r"x\.shard1of2\.json .*leave a gap")
    # shard 1 of another build (other codes: the first 9000 rows only)
    sources = ondisk.first_rows(ondisk.encoded_set_sources(setup["tmp"] / "db.npz")[0], 9000)
    ondisk.build_shard(setup["trained"], sources, path, process_index=1, process_count=2, chunk_rows=2000, log=quiet)
    merge(r"x\.shard1of2\.json was built from other codes")
    # a shard whose lists were cut short
    _shards(setup, tmp_path)
    with open(files[0].ivfdata, "r+b") as f:
        f.truncate(100)
    merge(r"x\.shard0of2\.ivfdata are truncated")


def test_ondisk_index_with_missing_or_truncated_lists(setup, tmp_path):
    path = tmp_path / "db.faissindex"
    qinco2_search.build_index(build_cfg(setup, path, "ondisk=true"), log=quiet)
    data = ondisk.ivfdata_path(path)
    # moved elsewhere with its lists: still found beside it
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(path, moved / path.name)
    shutil.move(data, moved / data.name)
    assert ivf.read_index(moved / path.name).ntotal == 10000
    (moved / data.name).rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"moved/db\.faissindex.*moved/db\.ivfdata"):
        ivf.read_index(moved / path.name)
    (tmp_path / "elsewhere").rename(moved / data.name)
    with open(moved / data.name, "r+b") as f:
        f.truncate(os.path.getsize(moved / data.name) - 1)
    with pytest.raises(ValueError, match=r"moved/db\.ivfdata are truncated"):
        ivf.read_index(moved / path.name)
    with pytest.raises(ValueError, match=r"truncated"):  # every search command opens it so
        qinco2_search.search(run_config.parse_run_args(
            ["task=search", f"model={K16_MODEL}", f"index={moved / path.name}", f"queries={FIXTURES / 'ivf_xq.npy'}",
             f"queries_gt={FIXTURES / 'ivf_gt.npy'}", "search.nprobe=[4]", "search.nshort=[10]"]), log=quiet)


def test_several_processes_need_ondisk(setup, tmp_path, monkeypatch):
    monkeypatch.setenv(distributed.PROCESS_INDEX_ENV, "0")
    monkeypatch.setenv(distributed.PROCESS_COUNT_ENV, "2")
    with pytest.raises(run_config.RunConfigError, match="needs ondisk=true"):
        qinco2_search.build_index(build_cfg(setup, tmp_path / "x.faissindex"), log=quiet)
    assert not list(tmp_path.iterdir())
