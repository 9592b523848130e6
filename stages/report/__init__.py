"""report: results tables (pandas, Parquet), learning-curve figures and the Markdown report."""
