"""Reading a run folder back: summaries and tables (summary) and plots (plots)."""
