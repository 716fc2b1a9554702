"""The network: families (how each backbone names its stages), build (timm / torchvision) with its stage map, weights (hub / local), stages (freeze, BN policy), inspect."""
