"""Data: buckets and frame sampling, captions, manifests, and the training dataset."""
