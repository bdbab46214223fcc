"""dtype-bench: shared components for measuring how training precision changes speed, memory and quality."""
