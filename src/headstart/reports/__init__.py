"""What a run tells a reader: metrics, plots, the terminal, Markdown and HTML reports."""
