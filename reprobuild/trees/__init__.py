"""The tree model and its readers: directories, tar, OCI layouts, overrides, diffs."""
