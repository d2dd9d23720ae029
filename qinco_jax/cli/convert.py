"""Convert a QINCo model between the reference's .pt format and qinco-jax directories.

Either side may be a reference `.pt` file (`torch.save` of a whole model_qinco module,
loadable by the reference) or a qinco-jax model directory (orbax parameters +
model.json); the output format follows the output name (`*.pt` or anything else).
PyTorch is not needed.

    python convert/convert_checkpoint.py --model models/bigann_8x8_L2.pt --o models/bigann_8x8_L2
    python convert/convert_checkpoint.py --model run/model --o run/model.pt --check
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qinco_jax import cli


def build_parser():
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="input model: a reference .pt file or a qinco-jax model directory")
    p.add_argument("--o", default="", help="output: a name ending in .pt writes the reference format, "
                                           "anything else a qinco-jax model directory (replaced atomically)")
    p.add_argument("--check", default=False, action="store_true",
                   help="reload the output, encode and decode random vectors with both models and report "
                        "their agreement (fails if codes or parameters differ)")
    p.add_argument("--nvec", default=1000, type=int, help="number of random vectors used by --check")
    p.add_argument("--seed", default=0, type=int, help="random seed of the --check vectors")
    return p


def random_vectors(model, n: int, seed: int) -> np.ndarray:
    """Vectors around the model's own reconstructions, so that encoding exercises
    every step (pure noise would sit far from all codewords)."""
    from qinco_jax.models import codec

    rs = np.random.RandomState(seed)
    codes = np.stack([rs.randint(k, size=n) for k in model.code_sizes], axis=1)
    centres = codec.decode(model, codes)
    spread = np.float32(0.1) * np.sqrt(np.mean(centres**2)) + np.float32(1e-6)
    return (centres + rs.randn(*centres.shape).astype(np.float32) * spread).astype(np.float32)


def parameter_leaves(model) -> list[np.ndarray]:
    import jax

    from qinco_jax.models.qinco import PQQincoModel

    # jax.tree.leaves drops a missing (None) OPQ matrix
    tree = ([s.params for s in model.subs], model.opq) if isinstance(model, PQQincoModel) else model.params
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def check(model, reloaded, n: int, seed: int) -> None:
    from qinco_jax import metrics
    from qinco_jax.models import codec

    same_params = model.config == reloaded.config and all(
        a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(parameter_leaves(model), parameter_leaves(reloaded)))
    x = random_vectors(model, n, seed)
    c1, c2 = codec.encode(model, x), codec.encode(reloaded, x)
    agree = float(np.mean(c1 == c2))
    y1, y2 = codec.decode(model, c1), codec.decode(reloaded, c1)
    rel = float(np.linalg.norm(y1 - y2) / max(np.linalg.norm(y1), 1e-30))
    mse = metrics.mean_squared_error(x, y1)
    print(f"check on {n} random vectors: parameters identical: {same_params}, codes equal: {agree:.2%}, "
          f"decoding relative difference: {rel:.3g}, MSE {mse:.6g}")
    if not same_params or agree < 1.0 or rel > 1e-6:
        raise ValueError("the converted model does not reproduce the input model")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.model or not args.o:
        raise cli.UsageError("both --model (input) and --o (output) are required")
    if args.nvec < 1:
        raise cli.UsageError(f"--nvec must be >= 1, got {args.nvec}")
    if Path(args.model).resolve() == Path(args.o).resolve():
        raise cli.UsageError("--o must differ from --model")
    from qinco_jax.formats.checkpoint import load_model, save_model

    model = load_model(args.model)
    print(f"loaded {args.model}: {model.describe()}")
    save_model(model, args.o)
    kind = "reference .pt file" if args.o.endswith(".pt") else "qinco-jax model directory"
    print(f"wrote {args.o} ({kind})")
    if args.check:
        check(model, load_model(args.o), args.nvec, args.seed)


def run() -> None:
    """Console entry point: bad input ends with one 'error:' line and exit status 2."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
