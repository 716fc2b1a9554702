"""Images in: scan a folder or manifest, split it, decode, transform and load batches; the dataset doctor."""
