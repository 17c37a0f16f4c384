"""Reports over result JSONs: comparison tables, plots and the CI drift check."""
