#!/bin/sh
# Run from the repository root; each step is skipped when its output exists. 1) a normally trained
# small CNN on the 4,000 kept training labels (the other 1,000 kept ones are its validation split);
# 2) pseudo-labels for every other training image; 3) the study (ARoW on the 5,000 labels alone, and
# with the pseudo-labelled images). Extra arguments go to `arow study` (e.g. --jobs 2).
set -e
[ -f studies/fmnist-teacher/final.pt ] || arow train --method natural --labels-kept studies/fmnist-kept5000.npy \
    --epochs 15 --val-attack clean --eval-attacks clean --no-guards --out studies/fmnist-teacher
[ -f studies/fmnist-pseudo.npz ] || arow pseudo-label studies/fmnist-teacher --data fashion-mnist:train \
    --exclude-kept studies/fmnist-kept5000.npy --out studies/fmnist-pseudo.npz
arow study studies/fmnist-semisup.yaml --out studies/fmnist-semisup "$@"
