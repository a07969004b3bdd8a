"""What Prometheus and the JSON API see: the last tick's snapshot, its collectors and the app."""
