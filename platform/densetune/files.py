"""The names of the files in a trial's checkpoint folder, for the trial that writes them and the tracker that logs
them (a module of its own: the tracker runs on the driver, which need not import torch or PEFT)."""

ADAPTER, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # as PEFT's save_pretrained names them
# The last checkpoint's record of the run: the test split's predictions, rank 0's summary, the adapter's snapshots.
PREDICTIONS, SUMMARY, SNAPSHOTS = "predictions.json", "summary.json", "snapshots.safetensors"
