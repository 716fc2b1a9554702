"""Ship the model: a graph that takes resized RGB uint8 images and returns calibrated probabilities, with its
preprocessing contract and class names inside (ONNX, TorchScript), proven equal to PyTorch on real images."""
