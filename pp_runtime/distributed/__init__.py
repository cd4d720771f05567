"""Process groups, point-to-point messaging, peer liveness and CPU threads per process."""
