"""Evaluation (`gendd evaluate`, `gendd report`): probe and generative paths, the refit probe, the comparison report."""
