"""General-capability probes. Each builds requests; one `Scorer` batches them for every probe."""
