"""KFP pipelines: full run, stage-only runs, scheduled retrain, small-data mode."""
