"""Paper-analysis tools: the style-drift token tables and training-curve plots."""
