"""What a trained model's outputs mean: predictions over images, and the metrics computed from them."""
