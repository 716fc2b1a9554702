"""The use cases, one module each: train (new / resume), evaluate and predict, compare, lr-find."""
