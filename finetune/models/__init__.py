"""The network: build (timm / torchvision) with its stage map, weights (hub / local), stages (freeze, BN policy), inspect."""
