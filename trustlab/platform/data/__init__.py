"""Datasets: manifests, synthetic default sets, image and video decoding."""
