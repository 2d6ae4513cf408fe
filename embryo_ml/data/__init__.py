"""Data layer: manifests, the image reader, splits, transforms, datasets, synthetic images."""
