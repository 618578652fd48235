"""The GitHub webhook receiver: `ephemera webhook`."""
