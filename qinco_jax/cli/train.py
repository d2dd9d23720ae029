"""Train a QINCo, QINCo-LR or IVF-QINCo model (JAX port of the reference train_qinco.py).

The reference's flags and defaults, e.g.

    python train/train_qinco.py --db bigann1M --nt 100_000 --M 8 --L 2 --h 256 --lr 0.001 \\
        --model models/bigann_T100k_8x8_L2.pt
    python train/train_qinco.py --ivf --db bigann1M --nt 500_000 --M 8 --L 2 --lr 0.001 \\
        --IVF_centroids models/bigann_centroids_65k.npy --ngpu 8 --model models/test_ivf_train.pt

Steps (--todo): train_rq trains a faiss ResidualQuantizer whose codebooks initialise the
model (IVF: on the residuals to the nearest IVF centroid); train trains the network.
The last --nval of the nt + nval training vectors are held out for validation.

--arch qinco2 trains a QINCo2 model (ICLR 2025) with QINCo2's recipe: normalisation by
the training set's mean and std, an RQ of k-means per step plus noise, AdamW (--lr
default 8e-4, --wd, --grad_clip by value), a 3-epoch ramp then a cosine over
--max_epochs epochs (QINCo2's `epochs`; training stops after --stop_patience epochs
without improvement or epochs + stop_patience + 1 epochs), epochs of --epoch_size
samples, unused codewords re-drawn after each epoch. --de, --dh (= --h), --A, --B size
the model; --model x.pt writes QINCo2's own file format.

Data parallel: --ngpu N uses the first N local devices (default: all), the global batch
(--batch_size) is split across them (and across all hosts' devices with --distributed;
QINCo2's run.py, by contrast, takes `batch` per device, as its reference does).
Multi-host: start one process per host with your cluster launcher and add --distributed,
e.g. under SLURM

    srun --nodes 2 --ntasks-per-node 1 python train/train_qinco.py --distributed ...

jax.distributed.initialize() reads the coordinator, process count and index from the
launcher's environment (SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID); --ngpu then counts devices per host.

--checkpoint DIR saves the full training state after every epoch; rerunning the same
command resumes after the last finished epoch and ends with the same model.

--tensorboard DIR writes TensorBoard event files (loss, learning rate and gradient norm
per step; validation MSE and codeword usage per epoch: see qinco_jax.training.monitor);
watch with `tensorboard --logdir DIR`. --dtype bfloat16 trains in mixed precision: the
network runs in bfloat16, parameters, optimizer state and loss stay float32.
"""

from __future__ import annotations

import numpy as np

from qinco_jax import cli, distributed
from qinco_jax.data import validation

DEFAULT_TODO = ["train_rq", "train"]


def add_data_args(p, *, nt_default: int = 500_000,
                  nval_help: str = "validation vectors, read after the --nt training vectors (in addition)") -> None:
    group = p.add_argument_group("database")
    cli.add_db_arg(group)
    group.add_argument("--training_data", default="",
                       help="file of training vectors (npy, fvecs, bvecs, fbin, u8bin); overrides --db")
    group.add_argument("--nt", default=nt_default, type=int, help="nb training vectors to use")
    group.add_argument("--nval", default=10_000, type=int, help=nval_help)
    group.add_argument("--db_scale", default=-1, type=float,
                       help="force database scaling. If not set, the maximum of the training set is used")


def add_model_args(p) -> None:
    group = p.add_argument_group("model parameters")
    group.add_argument("--ivf", default=False, action="store_true", help="train an IVF model")
    group.add_argument("--lowrank", default=False, action="store_true",
                       help="train QINCo-LR, with a low-rank projection in the concatenation block")
    group.add_argument("--M", default=8, type=int, help="number of sub-quantizers")
    group.add_argument("--L", default=4, type=int, help="number of residual blocks")
    group.add_argument("--K", default=256, type=int, help="codebook sizes")
    group.add_argument("--h", "--dh", dest="h", default=256, type=int,
                       help="hidden dimension of residual blocks (QINCo2's dh)")
    group.add_argument("--arch", default="qinco", choices=["qinco", "qinco2"],
                       help="model family: qinco (ICML 2024) or qinco2 (ICLR 2025, trained with its recipe)")
    group.add_argument("--de", default=None, type=int, help="QINCo2: width of the step networks (default: d)")
    group.add_argument("--A", default=16, type=int,
                       help="QINCo2: codewords pre-selected by the substep codebook (0: none)")
    group.add_argument("--B", default=32, type=int, help="QINCo2: beam size of encoding (training included)")
    group.add_argument("--qinco1_mode", default=False, action="store_true",
                       help="QINCo2: QINCo1 mode (no outer skip, QINCo1 initialisation)")
    group.add_argument("--rq_beam_size", default=1, type=int, help="beam size for the initial residual quantizer")
    group.add_argument("--seed", default=1234, type=int, help="random seed of the network initialisation")
    group.add_argument("--init", default="random", choices=["random", "rq_exact"],
                       help="network initialisation: random (the reference's) or rq_exact (output layers "
                            "zeroed: the untrained model decodes exactly as its RQ, training only improves it; "
                            "QINCo2: no codebook noise, out projection zeroed or codebook halved)")


def add_optim_args(p) -> None:
    group = p.add_argument_group("optimization parameters")
    group.add_argument("--ngpu", default=-1, type=int,
                       help="number of local devices to train on (-1: all; 0: the CPU)")
    group.add_argument("--lr", default=None, type=float,
                       help="base learning rate (default: 1e-4; with --arch qinco2, 8e-4)")
    group.add_argument("--max_epochs", default=None, type=int,
                       help="max nb of epochs (default: 1000). With --arch qinco2 (default: 60) it is the "
                       "length of the cosine schedule (QINCo2's `epochs`), not a hard cap: as QINCo2's run.py, "
                       "training goes on while validation improves, stopping after --stop_patience epochs "
                       "without a new best or after max_epochs + stop_patience + 1 epochs (--max_epochs 3: up to "
                       "14); lower --stop_patience to stop sooner")
    group.add_argument("--wd", default=0.1, type=float, help="qinco2: AdamW weight decay")
    group.add_argument("--grad_clip", default=0.1, type=float, help="qinco2: clip gradients by value (0: no)")
    group.add_argument("--epoch_size", default=None, type=int,
                       help="qinco2: training samples per epoch, cycling through the data (default: all)")
    group.add_argument("--ramp_epochs", default=3, type=float, help="qinco2: linear warm-up epochs")
    group.add_argument("--stop_patience", default=10, type=int,
                       help="qinco2: stop after this many epochs without improvement")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="bfloat16: mixed precision training (the network in bfloat16; parameters, "
                            "optimizer and loss in float32)")
    group.add_argument("--batch_size", default=1024, type=int,
                       help="global batch size, split across the devices of all processes (with --distributed "
                            "too: each of W devices trains on batch_size / W rows, as the reference's "
                            "bs // world_size per GPU); must divide by the number of devices")
    cli.add_search_args(group)  # the no-gradient encode of every training step
    group.add_argument("--persistent_optimizer", default=False, action="store_true",
                       help="keep Adam's moments across epochs (the reference rebuilds Adam every epoch)")
    group.add_argument("--distributed", default=False, action="store_true",
                       help="multi-host run: call jax.distributed.initialize() (needs a cluster launcher)")
    group.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                       help="progress bar within each epoch (auto: only on a terminal)")


def add_file_args(p) -> None:
    group = p.add_argument_group("files")
    group.add_argument("--RQ_filename", default="", help="Residual quantizer centroids (npy)")
    group.add_argument("--IVF_centroids", default="", help="IVF centroids file")
    group.add_argument("--model", default="",
                       help="file to store the best trained model (.pt: reference format, else a library directory)")
    group.add_argument("--checkpoint", default="", help="checkpoint directory to load/store during optimization")
    group.add_argument("--tensorboard", default="", metavar="DIR",
                       help="write TensorBoard event files (training curves) to this directory")
    group.add_argument("--history", default="",
                       help="JSON history of the training (default: <model>.history.json when --model is set)")


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    group = p.add_argument_group("what to do")
    group.add_argument("--todo", default=DEFAULT_TODO, choices=["train_rq", "train"], nargs="+", help="what to do")
    add_data_args(p)
    add_model_args(p)
    add_optim_args(p)
    add_file_args(p)
    return p


# --------------------------------------------------------------------------------------


def load_training_vectors(args, log=print) -> np.ndarray:
    """The first nt + nval training vectors: of --training_data or of a --db data set
    stored in a file, a memory map (training reads it batch by batch); of a generated
    data set, float32."""
    from qinco_jax.data.datasets import get_dataset
    from qinco_jax.formats.vecs_io import read_vectors
    from qinco_jax.training.streaming import check_training_rows

    need = args.nt + args.nval
    path, where = args.training_data, args.training_data
    if not path:
        ds = get_dataset(args.db)
        log(f"loading training vectors of data set {args.db}: {ds}")
        path_of = getattr(ds, "path_of", None)  # a data set of files: its training file
        path, where = (path_of("train") if path_of else None), f"data set {args.db}"
        if path is None:
            x = validation.as_finite_float32(ds.get_train(maxtrain=need), "training vectors")
            if len(x) < need:
                raise cli.UsageError(f"not enough training vectors in {where}: {len(x)} < "
                                     f"--nt {args.nt} + --nval {args.nval}")
            return x[:need]
    log(f"loading training data from {path}")
    x = read_vectors(path, mmap=True)
    if x.ndim != 2:
        raise cli.UsageError(f"{path}: expected a 2-D array of vectors, got shape {x.shape}")
    if len(x) < need:
        raise cli.UsageError(f"not enough training vectors in {where}: {len(x)} < --nt {args.nt} + --nval {args.nval}")
    try:
        check_training_rows(len(x), args.nval, getattr(args, "batch_size", 1), str(path))
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    validation.check_all_finite(x[:need], "training vectors")  # chunk by chunk, naming the file
    return x[:need]  # stays on disk: read batch by batch


def check_args(args) -> None:
    if args.nt < 1 or args.nval < 1:
        raise cli.UsageError(f"--nt and --nval must be >= 1, got {args.nt} and {args.nval}")
    if args.ivf and args.lowrank:
        raise cli.UsageError("--ivf and --lowrank cannot be combined (no IVF-QINCo-LR model exists)")
    if args.ivf and not args.IVF_centroids:
        raise cli.UsageError("--ivf needs --IVF_centroids (a file of K_IVF x d centroids)")
    if "train" in args.todo and "train_rq" not in args.todo and not args.RQ_filename:
        raise cli.UsageError("--todo train without train_rq needs --RQ_filename to read the RQ codebooks from")
    if args.tensorboard:
        from qinco_jax.training.monitor import check_writable_dir

        try:
            check_writable_dir(args.tensorboard, "--tensorboard")
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
    if args.arch == "qinco2" and args.todo != DEFAULT_TODO:
        raise cli.UsageError("--arch qinco2 trains its RQ initialisation within training: leave --todo "
                             "at its default (train_rq train)")
    try:
        model_spec_from_args(args)
        train_config_from_args(args)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def load_ivf_centroids(path: str, d: int) -> np.ndarray:
    from qinco_jax.data.training_set import read_ivf_centroids

    try:
        return read_ivf_centroids(path, d=d)
    except (FileNotFoundError, validation.VectorInputError):
        raise  # both name the file already
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def model_spec_from_args(args):
    from qinco_jax.training.recipe import ModelSpec

    variant = "ivf" if args.ivf else ("lowrank" if args.lowrank else "qinco")
    if args.arch == "qinco2":
        if args.db_scale > 0 or args.rq_beam_size != 1:
            raise ValueError("--db_scale and --rq_beam_size are QINCo v1 options; --arch qinco2 "
                             "normalises and trains its RQ with QINCo2's recipe")
        return ModelSpec(M=args.M, K=args.K, L=args.L, h=args.h, variant=variant, seed=args.seed, init=args.init,
                         arch="qinco2", de=args.de or 0, A=args.A, B=args.B, qinco1_mode=args.qinco1_mode)
    if args.de is not None or args.qinco1_mode or args.epoch_size is not None:
        raise ValueError("--de, --qinco1_mode and --epoch_size need --arch qinco2")
    return ModelSpec(M=args.M, K=args.K, L=args.L, h=args.h, variant=variant, rq_beam_size=args.rq_beam_size,
                     seed=args.seed, init=args.init, db_scale=args.db_scale if args.db_scale > 0 else None)


def train_config_from_args(args):
    from qinco_jax.training.loop import TrainConfig

    progress = {"auto": None, "on": True, "off": False}[args.progress]
    if args.arch == "qinco2":
        from qinco_jax.training.loop import qinco2_train_config

        epochs = 60 if args.max_epochs is None else args.max_epochs
        return qinco2_train_config(lr=8e-4 if args.lr is None else args.lr, epochs=epochs,
                                   batch_size=args.batch_size, weight_decay=args.wd, grad_clip=args.grad_clip,
                                   epoch_size=args.epoch_size, ramp_epochs=args.ramp_epochs,
                                   stop_patience=args.stop_patience, seed=args.seed, dtype=args.dtype,
                                   encode=cli.encode_options_from_args(args), ngpu=args.ngpu, progress=progress)
    return TrainConfig(lr=1e-4 if args.lr is None else args.lr,
                       max_epochs=1000 if args.max_epochs is None else args.max_epochs, batch_size=args.batch_size,
                       persistent_optimizer=args.persistent_optimizer, encode=cli.encode_options_from_args(args),
                       ngpu=args.ngpu, progress=progress, dtype=args.dtype)


def history_path(args) -> str | None:
    if args.history:
        return args.history
    if args.model:
        return args.model.rstrip("/") + ".history.json"
    return None


def make_monitor(tensorboard_dir: str):
    """The training monitor of --tensorboard (none: a NullMonitor)."""
    from qinco_jax.training import monitor

    return monitor.TensorBoardMonitor(tensorboard_dir) if tensorboard_dir else monitor.NullMonitor()


def train_from_args(args, xt_all: np.ndarray, log=print):
    """The steps of --todo on loaded vectors (nt + nval of them): returns the TrainResult
    (or None when only the RQ was trained)."""
    from qinco_jax.training import recipe
    from qinco_jax.training import loop as training
    from qinco_jax.formats.io import save_npy

    check_args(args)
    spec = model_spec_from_args(args)
    cfg = train_config_from_args(args)
    if "train" in args.todo:  # fail on device / batch mismatches before the RQ is trained
        training.check_batch_size(args.batch_size, training.make_mesh(args.ngpu))
    if len(xt_all) < args.nt + args.nval:
        raise cli.UsageError(f"not enough training vectors: {len(xt_all)} < --nt {args.nt} + --nval {args.nval}")
    xt_all = xt_all[:args.nt + args.nval]
    xt, xval = xt_all[:-args.nval], xt_all[-args.nval:]
    log(f"training set {xt.shape}, validation {xval.shape}")
    centroids = load_ivf_centroids(args.IVF_centroids, xt.shape[1]) if args.ivf else None

    rq_codebooks = None
    resuming = "train" in args.todo and recipe.will_resume(args.checkpoint or None)
    if spec.is_qinco2:
        pass  # its RQ is trained within train_model (on the first epoch's rows)
    elif "train_rq" in args.todo and not resuming:
        rq_codebooks = recipe.train_rq_codebooks(xt, spec, xval, centroids, log=log)
        if args.RQ_filename:
            log(f"storing RQ codebooks to {args.RQ_filename}")
            save_npy(args.RQ_filename, rq_codebooks)
    if "train" not in args.todo:
        return None
    if rq_codebooks is None and not resuming and not spec.is_qinco2:
        log(f"reading RQ codebooks from {args.RQ_filename}")
        rq_codebooks = np.load(args.RQ_filename)
    if not args.model:
        log("warning: no --model given, the trained model will not be saved")
    monitor = make_monitor(args.tensorboard)
    try:
        result = recipe.train_model(xt, xval, spec, cfg, ivf_centroids=centroids,
                                    rq_codebooks=rq_codebooks,
                                    model_path=args.model or None, checkpoint_dir=args.checkpoint or None,
                                    history_path=history_path(args), log=log, monitor=monitor)
    except ValueError as e:
        if "db_scale" in str(e):
            raise cli.UsageError(f"{e} (--db_scale)") from None
        raise
    finally:
        monitor.close()
    if args.tensorboard:
        log(f"training curves are in {args.tensorboard} (tensorboard --logdir {args.tensorboard})")
    if args.model and result.history["epochs"]:
        best = min(e["val_mse"] for e in result.history["epochs"])
        log(f"best model (val MSE {best:g}) is in {args.model}")
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.distributed:
        distributed.start(required=True)
    cli.print_args(args)
    check_args(args)
    xt_all = load_training_vectors(args)
    return train_from_args(args, xt_all)


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
