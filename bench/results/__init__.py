"""Results: the run store, statistics and summaries, baselines, comparisons and the history."""
