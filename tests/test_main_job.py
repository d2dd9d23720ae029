"""The main job (qinco_jax.experiments.main_job, what `make demo` runs) end to end on a tiny
configuration: every method in summary.json at equal bytes per vector with an MSE and
operating points, the plot, the MSE tables; the CLI's flags map onto the config."""

from __future__ import annotations

import dataclasses
import json
import math

import matplotlib.image
import pytest

from qinco_jax import cli
from qinco_jax.training import recipe
from qinco_jax.cli import main_job as main_job_cli
from qinco_jax.experiments.main_job import MainJobConfig, run

TINY = dict(db="synthetic_small", n_centroids=16, nt=3000, nval=300, M=4, L=1, h=16, epochs=2, lr=1e-3,
            rq_beam=2, aq_train=2000, nprobe=(1, 4), nshort=(10, 20), progress=False)
TINY_QINCO2 = dict(qinco2_L=1, qinco2_h=16, qinco2_de=16, qinco2_A=4, qinco2_B=1, qinco2_epochs=1)


def _check_summary(s: dict, out, names: list[str], M: int) -> None:
    assert json.loads((out / "summary.json").read_text()) == s
    assert [m["name"] for m in s["methods"]] == names
    assert {m["bytes_per_vector"] for m in s["methods"]} == {M}
    for m in s["methods"]:
        assert math.isfinite(m["mse"]) and m["mse"] > 0, m["name"]
        assert len(m["points"]) >= 2, m["name"]
        for p in m["points"]:
            assert {"parameters", "ms_per_query", "recall@1", "recall@10"} <= set(p)
            assert 0 <= p["recall@1"] <= p["recall@10"] <= 1 and p["ms_per_query"] > 0
    image = matplotlib.image.imread(out / "pareto.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_tiny_main_job(tmp_path):
    logged = []
    s = run(MainJobConfig(out=str(tmp_path), qinco2=False, **TINY), log=logged.append)
    _check_summary(s, tmp_path, ["IVF-PQ", "IVF-RQ (beam 2)", "IVF-QINCo: AQ shortlist only", "IVF-QINCo"], 4)
    qinco = s["methods"][-1]
    assert {(p["parameters"]["nprobe"], p["parameters"]["nshort"]) for p in qinco["points"]} == {
        (1, 10), (1, 20), (4, 10), (4, 20)}
    data = s["data"]
    assert data["nq"] > 0 and data["M"] == 4 and data["K_IVF"] == 16
    # the exact-RQ initialisation is where training started; the table shows it and QINCo
    val = data["val_mse"]["IVF-QINCo"]
    assert val["rq_init"] > 0 and val["trained"] > 0
    assert [r["name"].split(",")[0] for r in data["val_mse_table"]] == [
        "IVF-RQ codebooks", "IVF-QINCo", "IVF-QINCo"]  # start, greedy, the demo's beam (nearest list)
    assert set(data["stages"]) >= {"data", "IVF k-means", "IVF-PQ index", "IVF-RQ index", "search"}
    text = "\n".join(logged)
    assert "database MSE" in text and "validation MSE" in text and "recall@1 at equal time" in text


def test_cli_flags_map_onto_the_config():
    args = main_job_cli.build_parser().parse_args(
        ["--db", "synthetic_small", "--nprobe", "1", "2", "--qinco2", "off", "--progress", "off", "--lr", "0.01"])
    cfg = main_job_cli.config_from_args(args)
    assert cfg == dataclasses.replace(MainJobConfig(), db="synthetic_small", nprobe=(1, 2), qinco2=False,
                                      progress=False, lr=0.01)
    assert MainJobConfig().qinco2  # IVF-QINCo2 is part of the demo by default
    with pytest.raises(cli.UsageError, match="nprobe"):
        main_job_cli.config_from_args(main_job_cli.build_parser().parse_args(["--nprobe", "300"]))


def test_every_flag_is_explained():
    assert set(main_job_cli.HELP) == {f.name for f in dataclasses.fields(MainJobConfig)}
    assert "default: 256" in main_job_cli.build_parser().format_help().replace("\n", " ").replace("  ", " ")


@pytest.mark.parametrize("bad", [dict(M=0), dict(nshort=()), dict(init="zeros"), dict(epochs=-1)])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        MainJobConfig(**bad)


def test_tiny_main_job_with_qinco2(tmp_path):
    s = run(MainJobConfig(out=str(tmp_path), **TINY, **TINY_QINCO2), log=lambda msg: None)
    _check_summary(s, tmp_path, ["IVF-PQ", "IVF-RQ (beam 2)", "IVF-QINCo: AQ shortlist only", "IVF-QINCo",
                                 "IVF-QINCo2: AQ shortlist only", "IVF-QINCo2"], 4)
    # both families start from the IVF-RQ baseline's codebooks, exactly at its greedy error
    # (QINCo2 trained with B = 1 encodes greedily over candidates pre-selected by its
    # substep codebook, which starts as the RQ's)
    val = s["data"]["val_mse"]
    assert val["IVF-QINCo2"]["rq_init"] == pytest.approx(val["IVF-QINCo"]["rq_init"], rel=1e-4)
    assert val["IVF-QINCo2"]["trained"] < val["IVF-QINCo2"]["rq_init"]
    names = [r["name"] for r in s["data"]["val_mse_table"]]
    assert [n.split(",")[0] for n in names] == ["IVF-RQ codebooks", "IVF-QINCo", "IVF-QINCo",
                                               "IVF-RQ codebooks", "IVF-QINCo2", "IVF-QINCo2"]
    assert "beam 8 over 4 pre-selected" in names[-1]
    # the trained models and their indexes are saved, in the formats the search CLIs read
    import faiss

    from qinco_jax.formats import checkpoint
    from qinco_jax.search import index as ivf

    for stem in ("ivf_qinco", "ivf_qinco2"):
        model = checkpoint.load_model(tmp_path / f"{stem}.pt")
        index = faiss.read_index(str(tmp_path / f"{stem}.faissindex"))
        ivf.check_index_matches_model(index, model)
        assert index.ntotal == s["data"]["nb"] and model.config.is_qinco2 == (stem == "ivf_qinco2")
    # each index records its model: the other family's model, of the same shape, is refused
    from qinco_jax.search import QincoIndex, provenance

    qinco, qinco2 = (checkpoint.load_model(tmp_path / f"{stem}.pt") for stem in ("ivf_qinco", "ivf_qinco2"))
    assert QincoIndex.read(tmp_path / "ivf_qinco.faissindex", qinco).provenance.by == "fingerprint"
    with pytest.raises(provenance.ModelMismatchError, match="fingerprint"):
        QincoIndex.read(tmp_path / "ivf_qinco.faissindex", qinco2)


def test_database_codes_stay_in_the_nearest_ivf_list():
    """A free beam may file a vector under another list (lower MSE, missed by the probes);
    the codec, which the main job encodes with, keeps faiss's assignment: the nearest centroid."""
    import numpy as np

    from qinco_jax.models import codec
    from qinco_jax.config import EncodeOptions

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    centroids = x[:16] + 0.1
    model = recipe.initial_model(x, recipe.ModelSpec(M=2, K=16, L=1, h=8, variant="ivf"), None, centroids)
    options = EncodeOptions(beam=8)
    codes = codec.encode(model, x, options)
    np.testing.assert_array_equal(codes[:, 0], codec.assign_ivf(model, x))
    from qinco_jax.models import qinco as qm

    free = qm.encode_beam(codec.network_params(model.params), model.normalise(x), beam=8)[0]
    assert (np.asarray(free)[:, 0] != codes[:, 0]).any()  # the hazard this guards against is real here


def test_main_job_scales_its_sizes_to_a_small_data_set(tmp_path):
    """`make demo DEMO_ARGS="--db synthetic_small"`: the default nt + nval (100,000) is
    more than the data set holds; the job cuts both in the same proportion and says so."""
    logged = []
    small = {**TINY, "nt": MainJobConfig().nt, "nval": MainJobConfig().nval, "aq_train": MainJobConfig().aq_train,
             "epochs": 1}
    s = run(MainJobConfig(out=str(tmp_path), qinco2=False, **small), log=logged.append)
    data = s["data"]
    assert data["nt"] + data["nval"] == 5000 and data["nval"] == 250  # synthetic_small: 5,000 training vectors
    assert data["config"]["aq_train"] <= data["nt"]
    assert any("using nt=4750 and nval=250" in line for line in logged)


def test_main_job_never_saves_a_model_worse_than_its_start(tmp_path):
    """A learning rate far too high: no epoch beats the exact-RQ start on validation,
    so the saved model is the start (validation MSE equal to the RQ's)."""
    import numpy as np

    from qinco_jax.data import datasets
    from qinco_jax.formats import checkpoint
    from qinco_jax.training import loop as training

    logged = []
    s = run(MainJobConfig(out=str(tmp_path), qinco2=False, **{**TINY, "lr": 0.5, "epochs": 1}), log=logged.append)
    val = s["data"]["val_mse"]["IVF-QINCo"]
    assert val["kept_start"] and val["trained"] == val["rq_init"]
    assert any("keeping the starting model" in line for line in logged)
    xt_all = np.asarray(datasets.get_dataset("synthetic_small").get_train(TINY["nt"] + TINY["nval"]), np.float32)
    saved = checkpoint.load_model(tmp_path / "ivf_qinco.pt")
    assert training.validation_mse(saved, xt_all[TINY["nt"]:]) == pytest.approx(val["rq_init"], rel=1e-4)
