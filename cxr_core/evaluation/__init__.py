"""Evaluation: metrics with intervals, figures, acquisition shifts, gates and shortcut audits."""
