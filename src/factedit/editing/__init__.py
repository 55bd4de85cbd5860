"""Editing methods and what they share: requests, keys, values, templates, patches, hyper-parameters."""
