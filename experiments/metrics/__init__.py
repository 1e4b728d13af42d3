"""What a run measures, as functions of a model and records: CounterFact scores (counterfact),
downstream probes (probes), perplexity, generation fluency and consistency (generation), the
batched scoring forwards they share (scoring), the formulas on plain numbers (formulas), and the
named protocols that fix how the numbers are defined (protocols)."""
