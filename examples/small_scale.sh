#!/usr/bin/env bash
# The small-scale IVF-QINCo example, end to end, on the built-in synthetic data set:
#   k-means IVF centroids -> IVF-QINCo training -> AQ-approximated IVF-RQ index
#   -> search over nprobe x nshort -> table, recall/time plot (PNG) and JSON results.
# It only chains the project's command-line programs: every step below is a command a
# user can run by hand. `make demo` runs it in the project's virtual environment.
#
# Every size can be overridden from the environment, e.g. the test suite's tiny run:
#   DB=synthetic_small N_CENTROIDS=32 NT=4000 NVAL=500 M=2 EPOCHS=2 OUT=/tmp/demo bash examples/small_scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/demo}
DB=${DB:-synthetic}              # built in: 100k training, 50k database, 1k queries, d=32
N_CENTROIDS=${N_CENTROIDS:-256}  # K_IVF
NT=${NT:-50000}                  # training vectors for QINCo (+ NVAL held out for validation)
NVAL=${NVAL:-5000}
M=${M:-8}                        # QINCo steps after the IVF step: M bytes per vector
L=${L:-2}
H=${H:-128}
EPOCHS=${EPOCHS:-5}                # a short run: the validation MSE is still falling
BATCH=${BATCH:-256}
NPROBE=${NPROBE:-1 2 4 8 16 32}
NSHORT=${NSHORT:-10 20 50 100 200}
INDEX_KEY="IVF${N_CENTROIDS},RQ${M}x8_Nqint8"

mkdir -p "$OUT"
step() { echo; echo "=== $* ==="; }

step "1/4 IVF centroids: k-means with $N_CENTROIDS centroids"
$PYTHON search/search_ivf.py --todo train_centroids --db "$DB" \
    --n_centroids "$N_CENTROIDS" --nt $((NT + NVAL)) --IVF_centroids "$OUT/centroids.npy"

step "2/4 IVF-QINCo training (M=$M, L=$L, h=$H, $EPOCHS epochs)"
$PYTHON train/train_qinco.py --ivf --db "$DB" --nt "$NT" --nval "$NVAL" \
    --M "$M" --L "$L" --h "$H" --lr 0.001 --batch_size "$BATCH" --max_epochs "$EPOCHS" \
    --IVF_centroids "$OUT/centroids.npy" --model "$OUT/model.pt" \
    --checkpoint "$OUT/checkpoint" --history "$OUT/train_history.json" --progress on

step "3/4 index $INDEX_KEY: AQ codebooks fitted to the QINCo codes, database added; search"
# shellcheck disable=SC2086  # NPROBE / NSHORT are lists
$PYTHON search/search_ivf.py --todo train add search --db "$DB" --model "$OUT/model.pt" \
    --index_key "$INDEX_KEY" --nt $((NT + NVAL)) --index "$OUT/index.faissindex" \
    --nprobe $NPROBE --nshort $NSHORT --json "$OUT/search.json"

step "4/4 recall against time"
$PYTHON search/plot_results.py --json "$OUT/search.json" --db "$DB" --png "$OUT/pareto.png" \
    --title "IVF-QINCo on $DB: $INDEX_KEY, M=$M L=$L h=$H"

echo
echo "Done. Results: $OUT/search.json   plot: $OUT/pareto.png   model: $OUT/model.pt"
