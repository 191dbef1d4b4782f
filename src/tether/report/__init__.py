"""Reports: base-vs-tuned comparison tables, JSON, plots."""
