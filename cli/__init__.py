"""The `kidneyfl` command: mounts the site's and the coordinator's commands."""
