"""The results stage: reading a sweep's record from the MLflow store (`store`), the statistics (`stats`) and the
comparisons over its trials (`comparisons`), the learning curves (`curves`), the report's sections (`sections`),
figures (`figures`) and tables (`tables`), the report that composes them (`report`), and the study's summary table
(`summary`). It reads what the sweep stage wrote and never trains."""
