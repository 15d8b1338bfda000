"""densetune: the sweep platform (trials under Ray Train, sweeps under Ray Tune, tracking in MLflow).

It lives in platform/densetune so that the folder `platform/` never shadows the standard-library module.
"""
