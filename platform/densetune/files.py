"""The names of files, tags and artifacts that the writer and the readers share: a trial writes its checkpoint's files,
the sweep's tracker (sweep.record) logs them and tags its MLflow runs, and the results stage (results.store) finds and
reads them by these names. A module of its own: the tracker runs on the driver, which need not import torch or PEFT,
and a reader need not import Ray.
"""

ADAPTER, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # as PEFT's save_pretrained names them
# The last checkpoint's record of the run: the test split's predictions, rank 0's summary, the adapter's snapshots.
PREDICTIONS, SUMMARY, SNAPSHOTS = "predictions.json", "summary.json", "snapshots.safetensors"
# Every checkpoint's copy of the trial's settings (TrialConfig as JSON), also logged with its MLflow run: what trained
# the adapter beside it, read by densetune.evaluate and densetune.export.
TRIAL_CONFIG = "config.json"

# The tags of a sweep's MLflow runs: a run's role (sweep or trial), its sweep and study, a trial's Ray trial id.
ROLE, SWEEP, STUDY, TRIAL_ID = "densetune.role", "sweep", "study", "ray.trial_id"
# densetune.evaluate --log: a run of role "evaluation", a child of the trial run it evaluated (named in EVALUATED_RUN)
EVALUATION_ROLE, EVALUATED_RUN = "evaluation", "densetune.evaluated_run"
# --tune's study run, the parent of its phases' sweep runs, and its tuning table (densetune.tuning writes them)
TUNED_ROLE, TUNING_TABLE = "tuned", "tuning.csv"
# Logged when a trial ends: its wall time, and what it cost, the devices it reserved times that time.
WALL_TIME, DEVICE_SECONDS = "wall_time_s", "device_seconds"
# Reported once per trial and constant: logged as params, and the numbers among them also as metrics (at step 0), so
# that the UI and search_runs sort and filter them as numbers; a reader gives them back these types.
FACTS = {"trainable_params": int, "total_params": int, "trainable_pct": float, "total_steps": int, "precision": str}
