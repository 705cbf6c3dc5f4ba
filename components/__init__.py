"""KFP components, one folder per stage (see README)."""
