"""Offline evaluation on temporal splits: the split, the metrics, and one module per thing evaluated."""
