"""QINCo2's run.py configuration: the README's commands parse, bad input is refused clearly."""

import shlex

import pytest

from qinco_jax.cli import run_config as rc

# The QINCo2 README's commands (launcher words dropped), with some values they must give.
README_COMMANDS = [
    ("task=train model_args=qinco2-S db=deep1M M=16 output=runs/weights/qinco2_S-deep1M-16x8.pt resume=true",
     {"task": "train", "M": 16, "L": 2, "de": 128, "dh": 256, "A": 16, "B": 32, "K": 256, "resume": True,
      "lr": 0.0008, "optimizer": "adamw", "model_args": "qinco2-S"}),
    ("task=train model_args=qinco2-S L=1 dh=32 de=64 A=4 B=4 output=my_super_small_model-my_dataset-8x8.pt "
     "trainset=my_dataset-trainset.fvecs ds.loop=100_000 ds.valset=10_000",
     {"L": 1, "dh": 32, "de": 64, "A": 4, "B": 4, "M": 8, "trainset": "my_dataset-trainset.fvecs",
      "ds.loop": 100_000, "ds.valset": 10_000}),
    ("cpu=true task=train model=runs/weights/qinco2_S-deep1M-8x8.pt output=runs/weights/qinco2_S-deep1M-8x8-2.pt "
     "db=deep1M verbose=false",
     {"cpu": True, "verbose": False, "model": "runs/weights/qinco2_S-deep1M-8x8.pt", "M": None, "db": "deep1M"}),
    ("task=train model_args=qinco1 db=deep1M output=runs/weights/qinco1-deep1M-8x8.pt",
     {"L": 16, "de": None, "dh": 256, "A": 0, "B": 1, "optimizer": "adam", "lr": 0.0001, "wd": 0.0,
      "grad_clip": 0.0, "qinco1_mode": True, "scheduler.name": "reduce_lr_plateau",
      "scheduler.lr_min_fact": 0.01, "scheduler.stop_patience": 20}),
    ("task=eval model=models/qinco2_L-bigann1M-8x8.pt db=bigann1M A=32 B=64", {"A": 32, "B": 64, "db": "bigann1M"}),
    ("task=eval model=my_super_small_model-my_dataset-8x8.pt db=my_dataset-db.fvecs ds.db=100_000",
     {"ds.db": 100_000, "db": "my_dataset-db.fvecs"}),
    ("task=search model=models/qinco2_L-bigann1M-8x8.pt db=bigann1M A=32 B=64", {"task": "search", "index": None}),
    ("task=eval_valset model=m.pt trainset=t.fvecs ds.valset=5000", {"ds.valset": 5000}),
    ("task=ivf_centroids ivf_K=1048576 db=deep1M output=runs/ivf_centroids/ivf_centroids-deep1M-1048576.npy",
     {"ivf_K": 1048576}),
    ("task=ivf_centroids ivf_K=700 trainset=my_dataset-trainset.fvecs "
     "output=runs/ivf_centroids/ivf_centroids-my_dataset-K=700.npy",
     {"ivf_K": 700, "output": "runs/ivf_centroids/ivf_centroids-my_dataset-K=700.npy"}),
    ("task=train model_args=qinco2-S db=deep1M output=runs/weights/IVF-qinco2_S-deep1M-8x8.pt "
     "ivf_centroids=models/ivf_centroids-deep1M-1048576.npy",
     # the centroids file decides ivf_K (issue 20), not the preset's 2^20
     {"ivf_centroids": "models/ivf_centroids-deep1M-1048576.npy", "ivf_K": None}),
    ("task=encode db=deep1B model=models/IVF-qinco2_S-deep1B-8x8.pt "
     "output=runs/encoded_db/IVF-qinco2_S-deep1B-8x8_db.npz", {"encode_trainset": False}),
    ("task=encode db=deep1B encode_trainset=true model=models/IVF-qinco2_S-deep1B-8x8.pt "
     "output=runs/encoded_db/IVF-qinco2_S-deep1B-8x8_trainset.npz", {"encode_trainset": True}),
    ("task=encode db=my_dataset-trainset.fvecs model=my-custom-IVF-model.pt output=my_encoded_trainset.npz", {}),
    ("task=train_pairwise_decoder db=deep1B ivf_centroids=models/ivf_centroids-deep1M-1048576.npy "
     "output=runs/weights/qinco2s-ivf-deep1B-8x8_pairwise_decoder.pt "
     "encoded_trainset=runs/encoded_db/IVF-qinco2_S-deep1M-8x8_trainset.npz", {"n_pairwise_codebooks": 2}),
    ("task=build_index db=deep1B ivf_centroids=models/ivf_centroids-deep1M-1048576.npy "
     "output=runs/index/index-IVF-qinco2_S-deep1B-8x8.faissindex "
     "encoded_trainset=runs/encoded_db/IVF-qinco2_S-deep1M-8x8_trainset.npz "
     "encoded_db=runs/encoded_db/IVF-qinco2_S-deep1M-8x8_db.npz ds.db=300_000 ds.trainset=100_000 ds.valset=10_000",
     {"ds.db": 300_000, "ds.trainset": 100_000}),
    ("cpu=true task=search db=deep1B model=models/IVF-qinco2_S-deep1B-8x8.pt "
     "index=runs/index/index-IVF-qinco2_S-deep1B-8x8.faissindex "
     "output=runs/logs/search_results-IVF-qinco2_S-deep1B-8x8_v2.json resume=true "
     "pairwise_decoder=runs/weights/qinco2s-ivf-deep1B-8x8_pairwise_decoder.pt",
     {"pairwise_decoder": "runs/weights/qinco2s-ivf-deep1B-8x8_pairwise_decoder.pt"}),
    # the fixture generator's overrides
    ("task=train cpu=true verbose=false seed=0 epochs=10 batch=256 scheduler.stop_patience=2 ds.valset=1000 "
     "M=4 K=256 L=2 de=48 dh=64 A=8 B=8 ivf_centroids=ivf_centroids_64.npy trainset=ivf_xt.npy ds.loop=8192 "
     "output=m.pt",
     {"epochs": 10, "batch": 256, "scheduler.stop_patience": 2, "ds.loop": 8192, "scheduler.ramp_epochs": 3}),
    ("task=search queries=q.npy queries_gt=gt.npy index=i.faissindex model=m.pt search.nprobe=[1,4,16] "
     "search.nshort=[10,50,100] search.quantizer_efSearch=[16] search.nthreads=2",
     {"search.nprobe": (1, 4, 16), "search.nshort": (10, 50, 100), "search.quantizer_efSearch": (16,),
      "search.nthreads": 2}),
]


def _get(cfg, key):
    section, _, sub = key.partition(".")
    return getattr(getattr(cfg, section), sub) if sub else getattr(cfg, key)


@pytest.mark.parametrize("line,expected", README_COMMANDS)
def test_readme_commands_parse_and_are_complete(line, expected):
    cfg = rc.parse_run_args(shlex.split(line))
    for key, value in expected.items():
        assert _get(cfg, key) == value, key
    assert rc.missing_for_task(cfg) == []
    rc.check_task(cfg)


def test_defaults_are_the_reference_ones():
    cfg = rc.parse_run_args([])
    assert (cfg.lr, cfg.wd, cfg.grad_clip, cfg.batch, cfg.epochs, cfg.optimizer) == (8e-4, 0.1, 0.1, 1024, 60, "adamw")
    assert (cfg.ds.valset, cfg.ds.loop, cfg.ds.trainset) == (10_000, 10_000_000, None)
    assert (cfg.scheduler.name, cfg.scheduler.ramp_epochs, cfg.scheduler.lr_min_fact,
            cfg.scheduler.stop_patience) == ("cosine", 3, 1e-3, 10)
    assert (cfg.codebook_noise_init, cfg.enc_max_bs, cfg.seed, cfg.inference) == (0.1, 65536, 0, True)
    assert cfg.search.nshort == (4, 10) and cfg.search.nmid_short == (1, 4)
    assert rc.missing_for_task(cfg) and "task is required" in rc.missing_for_task(cfg)[0]


def test_preset_then_command_line_wins():
    cfg = rc.parse_run_args(["model_args=qinco2-L", "L=3", "lr=1e-3"])
    assert (cfg.L, cfg.de, cfg.dh, cfg.lr) == (3, 384, 384, 1e-3)
    q1 = rc.parse_run_args(["model_args=qinco1", "scheduler.patience=5", "grad_clip=0.2"])
    assert q1.scheduler.patience == 5 and q1.grad_clip == 0.2 and q1.scheduler.name == "reduce_lr_plateau"
    assert rc.parse_run_args(["model_args=qinco2-M"]).L == 4


@pytest.mark.parametrize("text,value", [
    ("null", None), ("NULL", None), ("true", True), ("False", False), ("10_000", 10000), ("-3", -3),
    ("1e-3", 1e-3), ("0.5", 0.5), ("3.", 3.0), ("[1,4, 16]", [1, 4, 16]), ("[]", []), ("'12'", "12"),
    ("path/to/x.npy", "path/to/x.npy"), ("inf", float("inf")),
])
def test_values(text, value):
    assert rc.parse_value(text) == value


def test_scalar_into_a_list_key_and_quoted_numbers_into_strings():
    cfg = rc.parse_run_args(["search.nprobe=8", "output='123'", "tensorboard=1e3", "model=true", "db=10_000"])
    assert cfg.search.nprobe == (8,) and cfg.output == "123" and cfg.tensorboard == "1e3"
    assert cfg.model == "true" and cfg.db == "10_000" and rc.parse_run_args(["db=null"]).db is None
    assert rc.parse_run_args(["lr=1"]).lr == 1.0 and isinstance(rc.parse_run_args(["lr=1"]).lr, float)


@pytest.mark.parametrize("words,message", [
    (["lrr=0.1"], "unknown key 'lrr'; did you mean 'lr'"),
    (["ds.lop=10"], "did you mean 'ds.loop'"),
    (["scheduler.ramp=2"], "did you mean 'scheduler.ramp_epochs'"),
    (["M=eight"], "M must be an integer"),
    (["M=4.5"], "M must be an integer"),
    (["cpu=1"], "cpu must be true or false"),
    (["lr=fast"], "lr must be a number"),
    (["lr=null"], "lr cannot be null"),
    (["search.nprobe=[1,x]"], r"search.nprobe\[1\] must be an integer"),
    (["task=fly"], "unknown task 'fly'"),
    (["model_args=qinco3"], "unknown model_args 'qinco3'"),
    (["optimizer=sgd"], "unknown optimizer"),
    (["scheduler.name=step"], "unknown scheduler.name"),
    (["M=0"], "M must be >= 1"),
    (["A=300", "K=256"], "cannot exceed K=256"),
    (["lr=0"], "lr must be a finite number > 0"),
    (["M=4", "M=8"], "M is given twice"),
    (["train"], "'train' is not key=value"),
    (["+foo=1"], "not supported"),
    (["output=[a,b]"], "output must be a string"),
])
def test_bad_input_is_named(words, message):
    with pytest.raises(rc.RunConfigError, match=message):
        rc.parse_run_args(words)


@pytest.mark.parametrize("line,message", [
    ("task=train", "needs output=<file.pt>"),
    ("task=train output=m.pt trainset=t.npy M=4 K=16 L=1 dh=8 A=0", "task=train needs B=..."),
    ("task=train output=m.npy model_args=qinco2-S trainset=t.npy", "must end with .pt"),
    ("task=train output=m.pt model_args=qinco2-S", "needs trainset="),
    ("task=eval db=x.fvecs", "needs model="),
    ("task=encode model=m.pt output=o.npz", "needs db="),
    ("task=ivf_centroids output=c.npy trainset=t.npy", "needs ivf_K"),
    ("task=build_index output=i.faissindex trainset=t.npy ivf_centroids=c.npy encoded_trainset=t.npz",
     "needs encoded_db"),
    ("task=search model=m.pt", "index=<file.faissindex>"),
    ("task=search model=m.pt index=i.faissindex output=o.txt queries=q queries_gt=g", "must end with .json"),
    ("task=convert model=m.pt output=o.pt db=x.fvecs", "needs db=<bigann1M"),
])
def test_missing_requirements_are_named(line, message):
    cfg = rc.parse_run_args(shlex.split(line))
    with pytest.raises(rc.RunConfigError, match=message):
        rc.check_task(cfg)


def test_named_data_sets_resolve_to_the_reference_files(monkeypatch, tmp_path):
    monkeypatch.setenv("QINCO_DATA", str(tmp_path))
    bigann = rc.resolve_data(rc.parse_run_args(["db=bigann1M"]))
    assert bigann.name == "bigann1M" and bigann.mse_scale == 1e-4 and bigann.db_limit == 1_000_000
    assert bigann.db == str(tmp_path / "bigann" / "bigann_base.bvecs")
    assert bigann.trainset == str(tmp_path / "bigann" / "bigann_learn.bvecs")
    assert bigann.queries_gt == str(tmp_path / "bigann" / "gnd" / "idx_1M.ivecs")
    assert rc.resolve_data(rc.parse_run_args(["db=bigann1M", "ds.db=1000"])).db_limit == 1000
    deep1b = rc.resolve_data(rc.parse_run_args(["db=deep1B"]))
    assert deep1b.db_limit is None and deep1b.mse_scale == 1.0
    assert deep1b.queries == str(tmp_path / "deep1b" / "deep1B_queries.fvecs")
    assert deep1b.queries_gt == str(tmp_path / "deep1b" / "deep1B_groundtruth.ivecs")
    contriever = rc.resolve_data(rc.parse_run_args(["db=contriever1M", "trainset=mine.npy"]))
    assert contriever.trainset == str(tmp_path / "contriever" / "training_set.npy")  # preset wins, as in the reference
    fb = rc.resolve_data(rc.parse_run_args(["db=FB_ssnpp1M"]))
    assert fb.mse_scale == 1e-4 and fb.trainset.endswith("training_set10010k.npy")
    files = rc.resolve_data(rc.parse_run_args(["db=x.fvecs", "trainset=t.npy", "ds.db=5"]))
    assert (files.name, files.db, files.trainset, files.db_limit, files.mse_scale) == (None, "x.fvecs", "t.npy", 5, 1.0)


def test_the_built_in_sift_images_set_is_a_preset(monkeypatch):
    """db=sift_images (the main job's data) reads the library's data set, as the reference's names do."""
    from qinco_jax.data import datasets

    class Fake:
        nb = 50_000

        def path_of(self, role):
            return f"/data/sift_images/{role}"

    asked = []
    monkeypatch.setattr(datasets, "get_dataset", lambda name: asked.append(name) or Fake())
    files = rc.resolve_data(rc.parse_run_args(["db=sift_images"]))
    assert asked == ["sift_images"]
    assert (files.name, files.db, files.queries, files.queries_gt, files.db_limit, files.mse_scale) == (
        "sift_images", "/data/sift_images/base", "/data/sift_images/query", "/data/sift_images/gt", None, 1e-4)


def test_pairwise_shrinkage_key():
    assert rc.parse_run_args(["pairwise_shrinkage=64"]).pairwise_shrinkage == 64.0
    assert rc.parse_run_args(["pairwise_shrinkage=0"]).pairwise_shrinkage == 0.0  # the reference's plain means
    assert rc.parse_run_args([]).pairwise_shrinkage is None  # chosen on held-out training rows
    assert rc.parse_run_args(["pairwise_shrinkage=null"]).pairwise_shrinkage is None
    with pytest.raises(rc.RunConfigError, match="pairwise_shrinkage"):
        rc.parse_run_args(["pairwise_shrinkage=-1"])


def test_index_key_interpolation():
    cfg = rc.parse_run_args(["M=4", "ivf_K=64"])
    assert rc.index_key(cfg) == "IVF64_HNSW32,RQ4x8_Nqint8"
    assert rc.index_key(rc.parse_run_args(["M=4"]), ivf_K=1024) == "IVF1024_HNSW32,RQ4x8_Nqint8"
    with pytest.raises(rc.RunConfigError, match="needs ivf_K"):
        rc.index_key(rc.parse_run_args(["M=4"]))
    custom = rc.parse_run_args(["search.index_key=IVF${ivf_K},PQ${ds.valset}", "ivf_K=8"])
    assert rc.index_key(custom) == "IVF8,PQ10000"
    with pytest.raises(rc.RunConfigError, match="unknown key"):
        rc.index_key(rc.parse_run_args(["search.index_key=IVF${nope}"]))


def test_uses_ivf_and_describe():
    assert rc.parse_run_args(["ivf_centroids=c.npy"]).uses_ivf
    assert not rc.parse_run_args([]).uses_ivf
    assert "M=8" in rc.parse_run_args(["task=train", "model_args=qinco2-S"]).describe()


@pytest.mark.parametrize("line,message", [
    ("task=eval model=m.pt db=x.fvecs encoded_db=c.npz", "task=eval does not use encoded_db"),
    ("task=ivf_centroids ivf_K=8 trainset=x.fvecs output=c.npy lr=0.1 batch=8", "task=ivf_centroids does not use lr, batch"),
    ("task=search model=m.pt index=i.faissindex queries=q.fvecs queries_gt=g.ivecs epochs=3",
     "task=search does not use epochs"),
    ("task=convert model=m.pt output=o.pt search.nprobe=[4]", "task=convert does not use search.nprobe"),
])
def test_a_key_the_task_does_not_read_is_an_error_naming_it(line, message):
    with pytest.raises(rc.RunConfigError, match=message):
        rc.parse_run_args(shlex.split(line))


def test_every_task_key_table_names_real_keys():
    keys = set(rc.valid_keys())
    for task, used in rc.TASK_KEYS.items():
        assert set(used) <= keys, (task, set(used) - keys)
    assert set(rc.ANY_TASK_KEYS) <= keys


def test_the_centroids_file_decides_ivf_K_over_a_preset():
    cfg = rc.parse_run_args(shlex.split("task=train model_args=qinco2-S trainset=x.fvecs output=m.pt "
                                        "ivf_centroids=c.npy"))
    assert cfg.ivf_K is None and cfg.M == 8  # the preset's other keys stay
    given = rc.parse_run_args(shlex.split("task=train model_args=qinco2-S trainset=x.fvecs output=m.pt "
                                          "ivf_centroids=c.npy ivf_K=300"))
    assert given.ivf_K == 300  # the command line's own value is checked against the file later
    assert rc.parse_run_args(shlex.split("task=train model_args=qinco2-S trainset=x.fvecs output=m.pt")).ivf_K == 1 << 20


def test_every_key_is_read_by_some_task():
    """A new key must be added to the tasks that read it (rc.TASK_KEYS), or the
    command line refuses it as unused."""
    covered = set(rc.ANY_TASK_KEYS).union(*map(set, rc.TASK_KEYS.values()))
    assert set(rc.valid_keys()) - covered == set()
