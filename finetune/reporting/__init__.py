"""Files a person reads: the evaluation report (CSV, JSON, PNG, Markdown, HTML) and the diff of two reports."""
