"""Reports: HTML and Markdown renderings of run and evaluation results."""
