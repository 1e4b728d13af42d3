"""Datasets: CounterFact (original and flattened schema), zsRE, custom edits, downstream probes."""
