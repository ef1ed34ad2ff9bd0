"""medmnist-ssl: the computing library behind the MLflow entry points (no CLI parsing here)."""
