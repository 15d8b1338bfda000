"""The data stage: benchmark files and the synthetic task (`loading`), prompts and the two protocols, answer formats,
tokenized rows (`tokens`) and length-grouped batches (`batching`). It knows nothing of models, Ray or MLflow."""
