"""dpaf-ray: private hyperparameter search of a DPAF generator with Ray Tune + Optuna.

    python tune.py                                  # private search on the embedded mnist-5k data
    python tune.py --search-space search_spaces/fashion-mnist.yaml --out runs/fmnist
    python tune.py --resume runs/fmnist             # continue an interrupted search

The release (runs/NAME/release/) carries one (ε, δ) covering training, scoring and the search.
"""
from dpaf_ray.tuning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
